#!/usr/bin/env bash
# What a new user gets from `make setup`: lmforge with its runtime dependencies only, no test extras, in a fresh
# venv. Every subcommand answers --help, and the smallest real run of each stage works: a ci-micro speedrun (data,
# tokenizer, pretrain, SFT), data stats and decontaminate, pretrain from a YAML config, then generate, chat,
# perplexity, eval and quantize on the speedrun's model, and serve, started, asked with the OpenAI client, stopped.
# (pull and data fetch download from package registries, export refuses the speedrun's Han-aware tokenizer: those
# three get --help only.) The suite cannot catch a module that only
# the test extras install (psutil once); this can. Any ModuleNotFoundError anywhere fails the run by name.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lmforge-runtime.XXXXXX")
SERVER=""
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
    rm -rf "$WORK" &  # in the background: a fresh torch install takes a minute to delete on a busy disk
}
trap cleanup EXIT
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/src"
export LMFORGE_CACHE="$WORK/cache" OMP_NUM_THREADS=2

say() { printf '== smoke (%ss): %s\n' "$SECONDS" "$*"; }
step=0
run() {  # run "$@", its output kept for the final check and shown if it fails
    step=$((step + 1))
    local log="$LOGS/$step.log"
    if ! "$@" >"$log" 2>&1; then
        cat "$log"
        echo "smoke: FAILED: $*" >&2
        exit 1
    fi
}

say "runtime-only install"
# A copy of the tree, so that pip's in-tree build leaves nothing behind in this checkout.
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
LMF="$WORK/venv/bin/lmforge"
run "$VPY" -m pip install --disable-pip-version-check "$TORCH"
run "$VPY" -m pip install --disable-pip-version-check "$WORK/src"

say "every third-party module lmforge imports (inside functions too) is installed"
run "$VPY" - <<'EOF'
import ast, importlib, pathlib, sys
import lmforge
optional = {"lm_eval"}  # the lm-eval extra, for eval/lm_eval_adapter.py alone
found = set()
for path in pathlib.Path(lmforge.__file__).parent.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
for name in sorted(found - set(sys.stdlib_module_names) - {"lmforge", "__future__"} - optional):
    importlib.import_module(name)
    print("ok", name)
EOF

say "--help of every subcommand"
"$VPY" - >"$WORK/commands" <<'EOF'
import argparse
from lmforge.cli import build_parser

def walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                print(" ".join([*path, name]))
                walk(sub, [*path, name])

walk(build_parser(), [])
EOF
run "$LMF" --help
while read -r -a command; do run "$LMF" "${command[@]}" --help; done <"$WORK/commands"
echo "$(wc -l <"$WORK/commands") subcommands"

say "speedrun ci-micro: synth, clean, dedup, tokenizer, tokenize, pretrain, sft"
R="$WORK/run"
MODEL="$R/sft/model"
run "$LMF" speedrun --preset ci-micro --out "$R" --no-progress
run "$LMF" data stats --input "$R/shards"
echo '{"question": "Once upon a time there was a small fox who lived by the river and liked apples."}' >"$WORK/eval.jsonl"
run "$LMF" data decontaminate --input "$R/dedup" --eval "$WORK/eval.jsonl" --out "$WORK/decon"
printf 'shards: %s\ntokenizer: %s\nout: %s\nseq_len: 64\nbatch_size: 4\nmax_steps: 2\nval_windows: 4\n' \
    "$R/shards" "$R/tokenizer" "$WORK/pretrain-yaml" >"$WORK/pretrain.yaml"
run "$LMF" pretrain --config "$WORK/pretrain.yaml" --no-progress
run "$LMF" plan --params 1e6

say "inference on the speedrun's chat model"
run "$LMF" generate "你好" --chat --model "$MODEL" --max-new-tokens 8 --json
printf 'hello\n/exit\n' >"$WORK/chat.txt"
run "$LMF" chat --model "$MODEL" --max-new-tokens 8 <"$WORK/chat.txt"
run "$LMF" perplexity --model "$MODEL" --text heldout-en --json
run "$LMF" eval --model "$MODEL" --tasks heldout --out "$WORK/eval"
run "$LMF" quantize --model "$MODEL" --bits 8 --out "$WORK/q8"
run "$LMF" models

say "serve: start, ask through the OpenAI client, stop"
PORT=$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$LMF" serve --model "$MODEL" --port "$PORT" --model-id smoke >"$LOGS/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do
    if "$VPY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then cat "$LOGS/serve.log"; echo "smoke: FAILED: serve exited" >&2; exit 1; fi
    sleep 0.5
done
run "$VPY" - "$PORT" <<'EOF'
import sys
from openai import OpenAI  # as `lmforge judge --judge-url` asks a server (the judge's prompt outgrows ci-micro's context)
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
reply = client.chat.completions.create(model="smoke", messages=[{"role": "user", "content": "你好"}], max_tokens=8)
assert reply.choices[0].message.role == "assistant", reply
print(reply)
EOF
kill -INT "$SERVER"
wait "$SERVER" || { cat "$LOGS/serve.log"; echo "smoke: FAILED: serve did not stop cleanly" >&2; exit 1; }
SERVER=""

if grep -l -E "ModuleNotFoundError|No module named" "$LOGS"/*.log; then
    grep -h -B2 -A2 -E "ModuleNotFoundError|No module named" "$LOGS"/*.log >&2
    echo "smoke: FAILED: a module lmforge imports is not among its declared dependencies (pyproject.toml)" >&2
    exit 1
fi
say "passed: $step steps in a runtime-only install"
