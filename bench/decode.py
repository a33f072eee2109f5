"""Decode and prefill speed of lmforge against its peers on the same weights, in the same run.

    python bench/decode.py --model smollm2-135m-instruct [--tokens 128] [--prompt 512] [--repeats 3]

Each runtime runs in its own subprocess (so peak RSS is its own): lmforge's engine, Hugging Face transformers
loading the same checkpoint directory (fp32), and llama.cpp through llama-cpp-python on the original GGUF file
when that package is installed. The run also measures this machine's memory read bandwidth, so that decode speed
can be set against its ceiling: bytes of weights read per token / bandwidth. Greedy decoding, EOS ignored.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def read_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best-of read bandwidth of a large fp32 reduction on all of torch's threads."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(directory: Path) -> int:
    """Bytes of weights one decode step reads: every matrix and vector, but only one row of an untied embedding."""
    from safetensors import safe_open

    total = 0
    cfg = json.loads((directory / "config.json").read_text())
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = st.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= s
                if name.endswith("embed_tokens.weight") and not cfg.get("tie_word_embeddings"):
                    n = shape[-1]
                total += n * 4
    return total


def run_ours(directory: Path, prompt_len: int, tokens: int, repeats: int) -> dict:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.engine import Engine, Stats
    from lmforge.sampling import SamplingParams

    model, tok = load_checkpoint(directory)
    engine = Engine(model, tok)
    prompt = _prompt_ids(tok.encode, prompt_len)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    decode, prefill = [], []
    for _ in range(repeats + 1):  # the first round warms up
        engine.reset()
        stats = Stats()
        for _ in engine.stream(prompt, params, stats):
            pass
        decode.append(stats.decode_tps)
        prefill.append(stats.prefill_tps)
    return {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}


def run_hf(directory: Path, prompt_len: int, tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompt = torch.tensor([_prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), prompt_len)])
    short = prompt[:, :16]
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    decode, prefill = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t_first = _timed(lambda: model.generate(short, max_new_tokens=1, min_new_tokens=1, **kw))
            t_all = _timed(lambda: model.generate(short, max_new_tokens=tokens, min_new_tokens=tokens, **kw))
            decode.append((tokens - 1) / max(t_all - t_first, 1e-9))
            prefill.append(prompt.shape[1] / _timed(lambda: model(prompt, use_cache=False, logits_to_keep=1)))
    return {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}


def run_llamacpp(gguf: Path, prompt_len: int, tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    llm = Llama(str(gguf), n_ctx=prompt_len + tokens + 64, n_threads=threads, n_batch=512, verbose=False)
    prompt = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), prompt_len)
    decode, prefill = [], []
    for _ in range(repeats + 1):
        llm.reset()
        prefill.append(prompt_len / _timed(lambda: llm.eval(prompt)))
        llm.reset()
        llm.eval(prompt[:16])
        t = time.perf_counter()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0)])
        decode.append(tokens / (time.perf_counter() - t))
    return {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}


def _prompt_ids(encode, n: int) -> list[int]:  # noqa: ANN001
    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 " * (n // 8 + 8)
    ids = list(encode(text))
    return ids[:n]


def child(args: argparse.Namespace) -> None:
    from lmforge.catalog import resolve_model

    directory = resolve_model(args.model)
    runners = {"ours": run_ours, "transformers": run_hf, "llama.cpp": run_llamacpp}
    target = _gguf_beside(directory) if args.runner == "llama.cpp" else directory
    out = runners[args.runner](target, args.prompt, args.tokens, args.repeats)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _gguf_beside(directory: Path) -> Path:
    found = sorted(directory.parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file beside {directory}")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runner", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runner:
        return child(args)

    from lmforge.catalog import resolve_model

    directory = resolve_model(args.model)
    bandwidth = read_bandwidth_gbs()
    wbytes = weight_bytes_per_token(directory)
    ceiling = bandwidth * 1e9 / wbytes
    print(f"model {args.model}: {wbytes / 1e6:.0f} MB of fp32 weights read per token")
    print(
        f"read bandwidth {bandwidth:.1f} GB/s -> fp32 decode ceiling {ceiling:.1f} tok/s; "
        f"threads {torch.get_num_threads()}"
    )
    runners = ["ours", "transformers"]
    try:
        import llama_cpp  # noqa: F401

        runners.append("llama.cpp")
    except ImportError:
        print("(llama-cpp-python not installed: llama.cpp column skipped)")
    results = {}
    for r in runners:
        cmd = [
            sys.executable,
            __file__,
            "--runner",
            r,
            "--model",
            args.model,
            "--tokens",
            str(args.tokens),
            "--prompt",
            str(args.prompt),
            "--repeats",
            str(args.repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{r}: failed\n{proc.stderr[-2000:]}")
            continue
        results[r] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{'runtime':<14}{'decode tok/s':>14}{'% ceiling':>11}{'prefill tok/s':>15}{'peak RSS MiB':>14}")
    for r, m in results.items():
        # llama.cpp reads its stored quantized weights, so the fp32 ceiling does not bound it.
        pct = "n/a" if r == "llama.cpp" else f"{100 * m['decode_tps'] / ceiling:.0f}%"
        print(
            f"{r:<14}{m['decode_tps']:>14.1f}{pct:>11}"
            f"{m['prefill_tps']:>15.1f}{m['peak_rss_mib']:>14.0f}"
        )
    if "ours" in results:
        for r, m in results.items():
            if r != "ours":
                print(
                    f"ours / {r}: decode {results['ours']['decode_tps'] / m['decode_tps']:.2f}x, "
                    f"prefill {results['ours']['prefill_tps'] / m['prefill_tps']:.2f}x"
                )


if __name__ == "__main__":
    main()
