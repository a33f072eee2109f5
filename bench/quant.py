"""Quantized lmforge against llama.cpp on the same weights, in the same run: size, memory, speed and quality.

    python bench/quant.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct] [--tokens 64] [--prompt 256]

For each model the float reference is lmforge's float checkpoint (the catalog GGUF, dequantized). From it:
- ours: fp32, INT8, INT4 (round-to-nearest on searched grids), INT4 mixed (q|k|v and down projections at INT8,
  `--quant int4:mixed`) and INT4 GPTQ, made by `lmforge quantize`;
- llama.cpp: the float weights exported to an f32 GGUF (`lmforge export`), then quantized by llama.cpp's own
  quantizer (`llama_model_quantize`) to Q8_0, Q4_K_M and Q4_1 (the same 5 bits per weight as our INT4); also the
  GGUF file the catalog ships, as its authors made it.
Every setting runs in its own subprocess (so peak RSS is its own) and reports weight MB, decode and prefill tok/s
and perplexity on the bilingual held-out text lmforge ships. Perplexity feeds both runtimes the same token ids in
the same sliding windows (lmforge.eval.perplexity.windows). Note: llama.cpp's quantized products round the
activations to 8 bits in every pass; ours do so only in decode steps (prefill/scoring expand the weights), so
our perplexity measures weight rounding alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

WINDOW, STRIDE = 512, 256  # perplexity windows, the same for both runtimes
# our settings: label, bits, method
OURS = (("int8", 8, "rtn"), ("int4", 4, "rtn"), ("int4:mixed", 4, "rtn"), ("int4-gptq", 4, "gptq"))
LLAMA = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def _prompt_ids(encode, n: int) -> list[int]:  # noqa: ANN001
    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 " * (n // 8 + 8)
    return list(encode(text))[:n]


def _heldout_ids(tokenizer) -> list[list[int]]:  # noqa: ANN001
    from lmforge.eval.perplexity import resolve_texts, text_ids

    return [text_ids(tokenizer, p.read_text(encoding="utf-8"))[0] for p in resolve_texts("heldout")]


# --- children: one setting each ----------------------------------------------------------------------------------


def run_ours(directory: Path, prompt_len: int, tokens: int) -> dict:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.engine import Engine, Stats
    from lmforge.eval.perplexity import sum_nll
    from lmforge.quant.quantize import weight_bytes
    from lmforge.sampling import SamplingParams

    model, tok = load_checkpoint(directory)
    out = {"weight_mb": weight_bytes(model) / 1e6}
    texts = _heldout_ids(tok)
    nll = sum(sum_nll(model, ids, WINDOW, STRIDE, batch_size=2, progress=False) for ids in texts)
    out["ppl"] = math.exp(nll / sum(len(ids) - 1 for ids in texts))
    engine = Engine(model, tok)
    prompt = _prompt_ids(tok.encode, prompt_len)
    decode, prefill = [], []
    for _ in range(3):  # the first round warms up
        engine.reset()
        stats = Stats()
        for _ in engine.stream(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True), stats):
            pass
        decode.append(stats.decode_tps)
        prefill.append(stats.prefill_tps)
    return out | {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}


def run_llamacpp(gguf: Path, prompt_len: int, tokens: int, tokenizer_dir: Path) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from lmforge.eval.perplexity import windows
    from lmforge.tokenizer import Tokenizer

    llm = Llama(
        str(gguf),
        n_ctx=max(WINDOW, prompt_len + tokens) + 64,
        n_threads=torch.get_num_threads(),
        n_batch=512,
        logits_all=True,
        verbose=False,
    )
    out = {"weight_mb": gguf.stat().st_size / 1e6}
    texts = _heldout_ids(Tokenizer.load(tokenizer_dir))  # our token ids: both runtimes score the same sequence
    nll, count = 0.0, 0
    for ids in texts:
        for w in windows(len(ids), WINDOW, STRIDE):
            llm.reset()
            llm.eval(ids[w.begin : w.end])
            logits = np.asarray(llm.scores[: w.end - w.begin], dtype=np.float64)  # (L, V): position p predicts p + 1
            rows = logits[w.first - w.begin - 1 : w.end - w.begin - 1]
            top = rows.max(-1, keepdims=True)
            logz = (top + np.log(np.exp(rows - top).sum(-1, keepdims=True)))[:, 0]
            nll += float((logz - rows[np.arange(len(rows)), ids[w.first : w.end]]).sum())
            count += w.end - w.first
    out["ppl"] = math.exp(nll / count)
    prompt = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), prompt_len)
    decode, prefill = [], []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(prompt_len / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0)])
        decode.append(tokens / (time.perf_counter() - t))
    return out | {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage: Linux carries ru_maxrss across exec, so a child started by a
    parent that held a model (while quantizing it) would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e6


def child(args: argparse.Namespace) -> None:
    target = Path(args.target)
    if target.suffix == ".gguf":
        out = run_llamacpp(target, args.prompt, args.tokens, Path(args.tokenizer))
    else:
        out = run_ours(target, args.prompt, args.tokens)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


# --- preparing the settings --------------------------------------------------------------------------------------


def prepare(name: str, work: Path, gptq: bool) -> tuple[Path, dict[str, Path]]:
    """The float checkpoint and every setting's weights (made once, kept under `work` for re-runs)."""
    from lmforge.catalog import resolve_model
    from lmforge.quant.quantize import QuantizeConfig, main
    from lmforge.quant.scheme import RECIPES

    source = resolve_model(name)
    work.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Path] = {"ours fp32": source}
    for label, bits, method in OURS:
        if method == "gptq" and not gptq:
            continue
        out = work / label.replace(":", "-")
        if not out.exists():
            t = time.perf_counter()
            keep = RECIPES["mixed"] if label.endswith(":mixed") else ()
            main(QuantizeConfig(out=str(out), model=str(source), bits=bits, method=method, int8_layers=keep))
            print(f"  quantized {label} in {time.perf_counter() - t:.0f} s", flush=True)
        settings[f"ours {label}"] = out
    try:
        import llama_cpp
    except ImportError:
        print("  (llama-cpp-python not installed: llama.cpp rows skipped)")
        return source, settings
    from lmforge.gguf_export import export_gguf

    f32 = work / "float-f32.gguf"
    if not f32.exists():
        export_gguf(source, f32)
    settings["llama.cpp f32"] = f32
    for label in ("Q8_0", "Q4_K_M", "Q4_1"):
        out = work / f"float-{label}.gguf"
        if not out.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, LLAMA[label])
            params.nthread = torch.get_num_threads()
            with _quiet_stderr():  # llama.cpp logs every tensor
                failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
            if failed:
                raise SystemExit(f"llama.cpp could not quantize {f32} to {label}")
        settings[f"llama.cpp {label}"] = out
    shipped = sorted(source.parent.glob("*.gguf"))
    if shipped:
        settings["llama.cpp, the catalog's GGUF"] = shipped[0]
    return source, settings


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure(target: Path, tokenizer_dir: Path, args: argparse.Namespace) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--target",
        str(target),
        "--tokenizer",
        str(tokenizer_dir),
        "--tokens",
        str(args.tokens),
        "--prompt",
        str(args.prompt),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"  {target}: failed\n{proc.stderr[-1500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(name: str, results: dict[str, dict]) -> None:
    print(f"\n### {name}\n")
    print("| setting | weight MB | peak RSS MB | decode tok/s | prefill tok/s | perplexity | ppl vs its float |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m in results.items():
        base = results.get("llama.cpp f32" if label.startswith("llama.cpp") else "ours fp32")
        rel = f"{100 * (m['ppl'] / base['ppl'] - 1):+.2f}%" if base else ""
        print(
            f"| {label} | {m['weight_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['decode_tps']:.1f} | "
            f"{m['prefill_tps']:.1f} | {m['ppl']:.3f} | {rel} |"
        )
    pairs = (
        ("ours int4", "llama.cpp Q4_K_M"),
        ("ours int4", "llama.cpp Q4_1"),  # the same 5 bits per weight: 4-bit codes, fp16 scale and offset per 32
        ("ours int4:mixed", "llama.cpp Q4_K_M"),
        ("ours int4-gptq", "llama.cpp Q4_K_M"),
        ("ours int8", "llama.cpp Q8_0"),
    )
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(
                f"\n{ours} / {theirs}: decode {a['decode_tps'] / b['decode_tps']:.2f}x, "
                f"prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x, weights {a['weight_mb'] / b['weight_mb']:.2f}x"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--no-gptq", action="store_true", help="skip the GPTQ setting (its calibration takes minutes)")
    ap.add_argument("--work", default=None, help="where quantized weights are kept (default: <cache>/bench-quant)")
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.target:
        return child(args)
    from lmforge.catalog import cache_dir

    print(f"threads {torch.get_num_threads()}; perplexity windows {WINDOW}/{STRIDE} on lmforge's held-out text")
    for name in args.models.split(","):
        print(f"\n{name}: preparing", flush=True)
        work = Path(args.work).expanduser() / name if args.work else cache_dir() / "bench-quant" / name
        source, settings = prepare(name, work, gptq=not args.no_gptq)
        results = {}
        for label, target in settings.items():
            if (m := measure(target, source, args)) is not None:
                results[label] = m
                print(f"  {label}: {m}", flush=True)
        report(name, results)


if __name__ == "__main__":
    main()
