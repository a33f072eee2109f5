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
from typing import TYPE_CHECKING

from lmforge import cli_align, cli_train
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.align.reward import RewardScorer
    from lmforge.engine import Engine
    from lmforge.sampling import SamplingParams

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


def _add_best_of(p: argparse.ArgumentParser, raw_prompt: bool = False) -> None:
    g = p.add_argument_group("best-of-n (give both)")
    wrapped = "; without --chat the reward model sees the prompt as one user message" if raw_prompt else ""
    g.add_argument("--best-of", type=int, default=None, metavar="N",
                   help=f"sample N replies together, keep the one --reward scores highest (temperature > 0){wrapped}")
    g.add_argument("--reward", default=None, metavar="RM_DIR", help="the reward model directory (`lmforge rm train`)")


def _scorer(args: argparse.Namespace, params: SamplingParams) -> RewardScorer | None:
    """The reward scorer for --best-of, or None; flag mistakes fail before any model loads."""
    from lmforge.align.bestof import check_best_of

    if (args.best_of is None) != (args.reward is None):
        raise LmforgeError("--best-of N and --reward RM_DIR go together: give both, or neither")
    if args.best_of is None:
        return None
    check_best_of(args.best_of, params.temperature)
    from lmforge.align.reward import RewardScorer

    return RewardScorer(args.reward)


def _add_model(p: argparse.ArgumentParser, quant: str | None = None) -> None:
    """--model, --quant and --adapter: the flags every command that runs a model shares (see loader.open_model).

    quant: the --quant default; chat and serve take "auto" (int8 on a CPU, see loader.default_quant)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    quants = "int8 or int4, e.g. int4:g64, int4:mixed, int4:gptq; none: float"
    default = "; default auto: int8 on a CPU unless the model or --adapter needs otherwise" if quant else ""
    p.add_argument("--quant", default=quant, help=f"quantize on load (once, then cached): {quants}{default}")
    p.add_argument("--adapter", default=None, help="a LoRA / P-Tuning v2 adapter directory to apply on top")


def _engine(args: argparse.Namespace):  # noqa: ANN202
    from lmforge.engine import Engine
    from lmforge.loader import open_model

    loaded = open_model(args.model, args.quant, args.adapter)
    return Engine(loaded.model, loaded.tokenizer, max_len=args.max_context), loaded.directory


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat import run_chat

    params = _sampling(args)  # bad flags fail before the model loads
    scorer = _scorer(args, params)
    engine, directory = _engine(args)
    run_chat(engine, params, args.system, args.model or directory.parent.name, scorer, args.best_of or 1)


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.engine import Stats

    params = _sampling(args)
    scorer = _scorer(args, params)
    engine, _ = _engine(args)
    tok = engine.tokenizer
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    messages = [{"role": "user", "content": prompt}]  # without --chat: for the reward model only
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + messages
        prompt = tok.render_chat(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    if scorer is not None:
        _generate_best_of(args, engine, scorer, messages, ids, params)
        return
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


def _generate_best_of(args: argparse.Namespace, engine: Engine, scorer: RewardScorer, messages: list[dict],
                      ids: list[int], params: SamplingParams) -> None:
    from lmforge.align.bestof import best_of

    result = best_of(engine, scorer, messages, args.best_of, params, prompt_ids=ids)
    if args.json:
        print(json.dumps({**result.to_json(), "prompt_tokens": len(ids)}, ensure_ascii=False))
    else:
        print(result.text)


def cmd_pull(args: argparse.Namespace) -> None:
    from lmforge.catalog import pull
    from lmforge.loader import AUTO, default_quant, quantized

    for name in args.names:
        directory = pull(name)
        print(directory)
        quant = default_quant(directory)[0] if args.quant == AUTO else args.quant
        if quant:  # made now, so that the first chat does not wait for it
            print(quantized(directory, quant))


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
    print(convert(src, Path(args.out), keep_quant=args.keep_quant))


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.quant.quantize import QuantizeConfig, main
    from lmforge.quant.scheme import RECIPES

    head = None if args.head_bits == "none" else int(args.head_bits)
    embed = None if args.embed_bits == "none" else int(args.embed_bits)
    cfg = QuantizeConfig(
        out=args.out,
        model=args.model,
        bits=args.bits,
        group_size=args.group_size,
        head_bits=head,
        embed_bits=embed,
        method=args.method,
        int8_layers=RECIPES[args.recipe] if args.recipe else (),
        calib=args.calib,
        calib_samples=args.calib_samples,
    )
    r = main(cfg)
    mib = 2**20
    print(
        f"{r['out']}: int{args.bits} g{args.group_size} {args.method}, weights {r['float_bytes'] / mib:,.0f} MiB -> "
        f"{r['quantized_bytes'] / mib:,.0f} MiB in {r['seconds']} s"
    )


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="weight-only INT8/INT4 quantization into a new checkpoint")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32)
    p.add_argument("--head-bits", choices=("4", "8", "none"), default="8", help="the output head (default 8)")
    p.add_argument("--embed-bits", choices=("4", "8", "none"), default="8", help="an untied embedding (default 8)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="round-to-nearest or calibrated GPTQ")
    p.add_argument("--recipe", choices=("mixed",), default=None,
                   help="mixed: keep the q/k/v and MLP down projections of an INT4 model at INT8")
    p.add_argument("--calib", default=None, help="UTF-8 calibration text for gptq (default: shipped bilingual text)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 256 tokens (gptq)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)


def cmd_perplexity(args: argparse.Namespace) -> None:
    from lmforge.eval.perplexity import PerplexityConfig, main

    cfg = PerplexityConfig(
        model=args.model,
        text=args.text,
        quant=args.quant,
        adapter=args.adapter,
        window=args.window,
        stride=args.stride,
        batch_size=args.batch_size,
        reference=args.reference,
    )
    result = main(cfg)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    versus = f" {'KL/token':>9} {'same top-1':>10}" if args.reference else ""
    print(f"{'text':<20} {'tokens':>8} {'bytes':>8} {'perplexity':>11} {'bits/byte':>10}{versus}")
    for r in [*result["texts"], result["total"]]:
        versus = f" {r['kl']:>9.5f} {r['same_top1']:>10.1%}" if args.reference else ""
        print(
            f"{r['name']:<20} {r['tokens']:>8} {r['bytes']:>8} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f}"
            f"{versus}"
        )


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.gguf_export import export_gguf

    print(export_gguf(args.src, args.out, args.type))


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.eval.run import EvalConfig, main

    cfg = EvalConfig(
        tasks=args.tasks,
        model=args.model,
        quant=args.quant,
        adapter=args.adapter,
        out=Path(args.out),
        shots=args.shots,
        cot=args.cot,
        samples=args.samples,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
    )
    result = main(cfg)
    for name, task in result["tasks"].items():
        scores = {k: v for k, v in task["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"{name:<24} " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    print(f"results: {result['run_dir']}\nreport:  {result['report']}")


def cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve import ServeConfig, main

    cfg = ServeConfig(
        model=args.model,
        quant=args.quant,
        adapter=args.adapter,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        insecure_no_auth=args.insecure_no_auth,
        max_batch=args.max_batch,
        max_context=args.max_context,
        model_id=args.model_id,
        reward=args.reward,
        best_of=args.best_of or 1,
    )
    main(cfg)


def cmd_judge(args: argparse.Namespace) -> None:
    from lmforge.engine import Engine
    from lmforge.eval import judge
    from lmforge.loader import open_model

    if bool(args.judge_url) == bool(args.judge_local):
        raise LmforgeError("give the judge as --judge-url URL --judge-model NAME, or as --judge-local MODEL")
    if args.judge_url and not args.judge_model:
        raise LmforgeError("--judge-url needs --judge-model (the model name the server expects)")
    questions = judge.read_prompts(Path(args.prompts) if args.prompts else None)[: args.limit]
    answers = []
    for model, quant, adapter in ((args.model, args.quant, args.adapter),
                                  (args.against or args.model, args.against_quant, args.against_adapter)):
        loaded = open_model(model, quant, adapter)
        answers.append(judge.answer(Engine(loaded.model, loaded.tokenizer), questions, args.max_new_tokens))
        del loaded
    if args.judge_url:
        ask, judge_name = judge.openai_judge(args.judge_url, args.judge_model, args.judge_key), args.judge_model
    else:
        loaded = open_model(args.judge_local, None, None)
        ask, judge_name = judge.local_judge(Engine(loaded.model, loaded.tokenizer)), args.judge_local
    names = (_contender(args.model, args.quant, args.adapter),
             _contender(args.against or args.model, args.against_quant, args.against_adapter))
    results = judge.write_results(Path(args.out), names, judge_name, judge.compare(questions, *answers, ask))
    print(json.dumps(results, ensure_ascii=False, indent=2))


def _contender(model: str | None, quant: str | None, adapter: str | None) -> str:
    return " ".join([model or "default"] + ([f"--quant {quant}"] if quant else []) +
                    ([f"--adapter {adapter}"] if adapter else []))


def _add_judge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="pairwise model-as-judge comparison of two models or settings (position-swapped)")
    _add_model(p)
    p.add_argument("--against", default=None, help="the second contender's model (default: the same as --model)")
    p.add_argument("--against-quant", default=None, help="the second contender's --quant")
    p.add_argument("--against-adapter", default=None, help="the second contender's --adapter")
    p.add_argument("--prompts", default=None, help="JSONL with a prompt field per line (default: 20 shipped, en+zh)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per contender answer")
    g = p.add_argument_group("judge (one of)")
    g.add_argument("--judge-url", default=None, help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", default=None, help="the model name to send to --judge-url")
    g.add_argument("--judge-key", default=None, help="API key for --judge-url")
    g.add_argument("--judge-local", default=None, help="a local model (catalog name, .gguf or directory) as judge")
    p.add_argument("--out", default="judge-results", help="results directory")
    p.set_defaults(func=cmd_judge)


def cmd_speedrun(args: argparse.Namespace) -> None:
    """speedrun.py writes the stages' command lines; they run here, through `main`, as a user's would."""
    from lmforge import speedrun

    out, log = Path(args.out), []
    for argv in speedrun.commands(args.preset, out, progress=not args.no_progress):
        command = "lmforge " + " ".join(argv)
        with speedrun.timed(command, log):
            if main(argv) != 0:
                raise LmforgeError(f"speedrun stopped at `{command}` (its error is printed above)")
    print(f"report: {speedrun.finish(args.preset, out, log)}")


def _add_speedrun(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speedrun", help="corpus -> tokenizer -> pretrain -> SFT -> samples and a report, one command")
    p.add_argument("--preset", choices=("ci-micro", "cpu-tiny", "gpu-small"), default="cpu-tiny")
    p.add_argument("--out", required=True, help="a new directory for every stage's output and REPORT.md")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_speedrun)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="From corpus to chat, bilingual by design.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model(p, quant="auto")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, temperature=0.7, top_p=0.9)
    _add_best_of(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    _add_model(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text, counts and speeds (with --best-of: every candidate, scored)")
    _add_sampling(p, temperature=0.0, top_p=1.0)
    _add_best_of(p, raw_prompt=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pull", help="fetch catalog models into the cache")
    p.add_argument("names", nargs="+")
    p.add_argument("--quant", default=None,
                   help="also make this quantized copy (auto: the one chat and serve use by default)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list catalog models and what is cached")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert a .gguf file, catalog model or HF directory to an lmforge checkpoint")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--keep-quant",
        action="store_true",
        help="keep a .gguf file's Q4_0/Q4_1/Q8_0 blocks as a quantized checkpoint (no float round trip)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("perplexity", help="perplexity and bits-per-byte of a model on a text file")
    _add_model(p)
    text_help = "a UTF-8 text file, or heldout, heldout-en, heldout-zh (shipped text; default %(default)s)"
    p.add_argument("--text", default="heldout", help=text_help)
    p.add_argument("--window", type=int, default=None, help="tokens per forward (default: min(1024, context))")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: 2048 tokens' worth)")
    p.add_argument(
        "--reference",
        default=None,
        help="also KL divergence from this model (e.g. the float one; same tokenizer) and top-1 agreement with it",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp / Ollama")
    p.add_argument("src", metavar="DIR", help="checkpoint directory or catalog name")
    p.add_argument("--to", choices=("gguf",), default="gguf", help="output format (default %(default)s)")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="weight type (default %(default)s)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a model on shipped or local benchmark tasks; writes a report card")
    _add_model(p)
    p.add_argument("--tasks", default="heldout,knowledge,arith", help="comma-separated: shipped names (heldout, "
                   "knowledge, arith) or KIND:PATH with KIND perplexity|mmlu|ceval|cmmlu|mc|gsm8k")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each question (default 0)")
    p.add_argument("--cot", action="store_true", help="chain of thought on generative tasks")
    p.add_argument("--samples", type=int, default=1, help="> 1: self-consistency vote over sampled chains")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task, en and zh alternating")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer on generative tasks")
    p.add_argument("--out", default="eval-results", help="results directory; its report compares all runs in it")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API and a web chat page")
    _add_model(p, quant="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (needed off loopback)")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default %(default)s)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per sequence (default: model's, <= 4096)")
    p.add_argument("--model-id", default=None, help="the model name clients send (default: from --model)")
    g = p.add_argument_group("best-of-n")
    g.add_argument("--reward", default=None, metavar="RM_DIR",
                   help="a reward model (`lmforge rm train`): requests may then send best_of > 1")
    g.add_argument("--best-of", type=int, default=None, metavar="N", help="candidates for sampled, non-streaming "
                   "requests that send no best_of (needs --reward; default 1: off)")
    p.set_defaults(func=cmd_serve)
    _add_quantize(sub)
    _add_judge(sub)
    cli_train.add_commands(sub, MODEL_HELP)
    cli_align.add_commands(sub)
    _add_speedrun(sub)
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
