"""The `lmforge` command: maps command-line flags onto each stage's dataclass and calls it.

Every user mistake surfaces as one `lmforge: error: ...` line and exit status 1 (see errors.LmforgeError);
anything else is a bug and keeps its traceback. Heavy imports happen inside the subcommands so that
`lmforge --help` and `lmforge models` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

MODEL_HELP = "catalog name, .gguf file or checkpoint directory (default: the catalog default)"


def _add_sampling(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=top_p)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--max-context", type=int, default=None, help="cap the context length (tokens)")


def _sampling(args: argparse.Namespace):  # noqa: ANN202 - imported lazily
    from lmforge.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    """--model, --quant and --adapter: the flags every command that runs a model shares (see loader.open_model)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--quant", default=None, help="quantize on load: int8 or int4 (optionally :g32|:g64|:g128)")
    p.add_argument("--adapter", default=None, help="a LoRA / P-Tuning v2 adapter directory to apply on top")


def _engine(args: argparse.Namespace):  # noqa: ANN202
    from lmforge.engine import Engine
    from lmforge.loader import open_model

    loaded = open_model(args.model, args.quant, args.adapter)
    return Engine(loaded.model, loaded.tokenizer, max_len=args.max_context), loaded.directory


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat import run_chat

    params = _sampling(args)  # bad flags fail before the model loads
    engine, directory = _engine(args)
    run_chat(engine, params, args.system, args.model or directory.parent.name)


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.engine import Stats

    params = _sampling(args)
    engine, _ = _engine(args)
    tok = engine.tokenizer
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = tok.render_chat(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    stats = Stats()
    pieces = []
    for piece in engine.stream(ids, params, stats):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        out = {
            "text": "".join(pieces),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "finish_reason": stats.finish_reason,
            "prefill_tokens_per_s": round(stats.prefill_tps, 2),
            "decode_tokens_per_s": round(stats.decode_tps, 2),
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        print()


def cmd_pull(args: argparse.Namespace) -> None:
    from lmforge.catalog import pull

    for name in args.names:
        print(pull(name))


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmforge.catalog import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table("name", "cached", "on disk / download", "description")
    for r in rows:
        size = r.get("disk_bytes") if r["cached"] else r.get("download_bytes")
        shown = f"{size / 2**20:,.0f} MiB" if size else ""
        name = r["name"] + (" (default)" if r.get("default") else "")
        table.add_row(name, "yes" if r["cached"] else "no", shown, r.get("description", ""))
    Console().print(table)


def cmd_convert(args: argparse.Namespace) -> None:
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import convert

    src = args.src if Path(args.src).exists() else resolve_model(args.src)
    print(convert(src, Path(args.out)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="From corpus to chat, bilingual by design.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, temperature=0.7, top_p=0.9)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    _add_model(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, counts and speeds")
    _add_sampling(p, temperature=0.0, top_p=1.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pull", help="fetch catalog models into the cache")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list catalog models and what is cached")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert a .gguf file, catalog model or HF directory to an lmforge checkpoint")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
