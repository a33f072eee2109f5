"""Quantized lmforge against llama.cpp on the same weights, in the same run: size, memory, speed and quality.

    python bench/quant.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct] [--tokens 64] [--prompt 256]

For each model the float reference is lmforge's float checkpoint (the catalog GGUF, dequantized). From it:
- ours: fp32, INT8, INT4 (round-to-nearest on searched grids), INT4 mixed (q|k|v and down projections at INT8,
  `--quant int4:mixed`), and both INT4 settings with GPTQ, made by `lmforge quantize`;
- llama.cpp: the float weights exported to an f32 GGUF (`lmforge export`), then quantized by llama.cpp's own
  quantizer (`llama_model_quantize`) to Q8_0, Q4_K_M and Q4_1 (the same 5 bits per weight as our INT4); also the
  GGUF file the catalog ships, as its authors made it.
Every setting runs in its own subprocess (so peak RSS is its own, taken after decoding and before scoring) and
reports weight MB, decode and prefill tok/s and perplexity on the bilingual held-out text lmforge ships. Both
runtimes score the same token ids in the same sliding windows (lmforge.eval.perplexity.windows), and every setting
is compared with ours fp32 position by position: mean KL divergence, top-1 agreement and a paired 95% interval for
the perplexity change (the fp32 child writes its log-probs, <work>/reference-logprobs.npy, for the others).
Note: llama.cpp's quantized products round the activations to 8 bits in every pass; ours do so only in decode
steps (prefill/scoring expand the weights), so our scores measure weight rounding alone.
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
import torch.nn.functional as F
from torch import Tensor

WINDOW, STRIDE = 512, 256  # perplexity windows, the same for both runtimes
# our settings: label, bits, method
OURS = (
    ("int8", 8, "rtn"),
    ("int4", 4, "rtn"),
    ("int4:mixed", 4, "rtn"),
    ("int4-gptq", 4, "gptq"),
    ("int4:mixed-gptq", 4, "gptq"),
)
LLAMA = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def _prompt_ids(encode, n: int) -> list[int]:  # noqa: ANN001
    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 " * (n // 8 + 8)
    return list(encode(text))[:n]


def _heldout_ids(tokenizer) -> list[list[int]]:  # noqa: ANN001
    from lmforge.eval.perplexity import resolve_texts, text_ids

    return [text_ids(tokenizer, p.read_text(encoding="utf-8"))[0] for p in resolve_texts("heldout")]


# --- quality: perplexity, and closeness to the float model's distributions -----------------------------------------


def _score(windows_logprobs: Iterator[tuple[Tensor, Tensor]], reference: Path, write: bool) -> dict:
    """Perplexity, mean KL(float || this) and top-1 agreement with the float model over the scored tokens.

    windows_logprobs yields (log-probs (S, V) float32, targets (S,)) per window in text order. The float setting
    (write=True) stores its log-probs as the reference (an .npy, read back without pickle); the others compare
    with it position by position. The per-token NLL differences also give a paired 95% interval for the
    perplexity change, which tells whether two settings' perplexities differ by more than the text's noise.
    """
    import numpy as np

    rows, nll, kl, agree, delta = 0, [], [], [], []
    ref = None if write else np.load(reference, mmap_mode="r", allow_pickle=False)
    stored = []
    for logprobs, targets in windows_logprobs:
        token_nll = -logprobs.gather(1, targets[:, None])[:, 0]  # (S,)
        nll.append(token_nll)
        if write:
            stored.append(logprobs.numpy().copy())
        else:
            base = torch.from_numpy(np.array(ref[rows : rows + len(targets)]))  # (S, V), a copy off the map
            kl.append(F.kl_div(logprobs, base, reduction="none", log_target=True).sum(-1))
            agree.append(base.argmax(-1) == logprobs.argmax(-1))
            delta.append(token_nll + base.gather(1, targets[:, None])[:, 0])
        rows += len(targets)
    if write:
        tmp = reference.with_suffix(".tmp.npy")
        np.save(tmp, np.concatenate(stored))
        tmp.replace(reference)
    out = {"ppl": math.exp(torch.cat(nll).double().mean().item()), "tokens": rows}
    if not write:
        d = torch.cat(delta).double()
        half = 1.96 * d.std().item() / math.sqrt(len(d))
        out |= {
            "kl": torch.cat(kl).double().mean().item(),
            "top1": torch.cat(agree).double().mean().item(),
            "ppl_change_ci": (math.expm1(d.mean().item() - half), math.expm1(d.mean().item() + half)),
        }
    return out


def _our_logprobs(model, texts: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:  # noqa: ANN001
    from lmforge.eval.perplexity import scored_logits, windows

    for ids in texts:
        for w in windows(len(ids), WINDOW, STRIDE):
            with torch.inference_mode():
                logits, targets = scored_logits(model, ids, [w])  # (S, V), (S,)
            yield torch.log_softmax(logits, -1), targets


def _llama_logprobs(llm, texts: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:  # noqa: ANN001
    from lmforge.eval.perplexity import windows

    for ids in texts:
        for w in windows(len(ids), WINDOW, STRIDE):
            llm.reset()
            llm.eval(ids[w.begin : w.end])
            rows = llm.scores[w.first - w.begin - 1 : w.end - w.begin - 1]  # (S, V): position p predicts p + 1
            logits = torch.from_numpy(rows.astype("float32"))
            yield torch.log_softmax(logits, -1), torch.tensor(ids[w.first : w.end])


# --- children: one setting each ----------------------------------------------------------------------------------


def run_ours(directory: Path, args: argparse.Namespace) -> dict:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.engine import Engine, Stats
    from lmforge.quant.quantize import weight_bytes
    from lmforge.sampling import SamplingParams

    model, tok = load_checkpoint(directory)
    out = {"weight_mb": weight_bytes(model) / 1e6}
    engine = Engine(model, tok)
    prompt = _prompt_ids(tok.encode, args.prompt)
    decode, prefill = [], []
    for _ in range(3):  # the first round warms up
        engine.reset()
        stats = Stats()
        for _ in engine.stream(prompt, SamplingParams(max_new_tokens=args.tokens, ignore_eos=True), stats):
            pass
        decode.append(stats.decode_tps)
        prefill.append(stats.prefill_tps)
    out |= {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}
    out["peak_rss_mb"] = _peak_rss_mb()  # before scoring, whose full-vocabulary log-probs are the bench's own
    return out | _score(_our_logprobs(model, _heldout_ids(tok)), Path(args.reference), args.write_reference)


def run_llamacpp(gguf: Path, args: argparse.Namespace) -> dict:
    from llama_cpp import Llama

    from lmforge.tokenizer import Tokenizer

    llm = Llama(
        str(gguf),
        n_ctx=max(WINDOW, args.prompt + args.tokens) + 64,
        n_threads=torch.get_num_threads(),
        n_batch=512,
        logits_all=True,
        verbose=False,
    )
    out = {"weight_mb": gguf.stat().st_size / 1e6}
    prompt = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), args.prompt)
    decode, prefill = [], []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(args.prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.tokens):
            llm.eval([llm.sample(temp=0.0)])
        decode.append(args.tokens / (time.perf_counter() - t))
    out |= {"decode_tps": statistics.median(decode[1:]), "prefill_tps": statistics.median(prefill[1:])}
    out["peak_rss_mb"] = _peak_rss_mb()
    texts = _heldout_ids(Tokenizer.load(Path(args.tokenizer)))  # our token ids: both runtimes score the same ones
    return out | _score(_llama_logprobs(llm, texts), Path(args.reference), write=False)


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage: Linux carries ru_maxrss across exec, so a child started by a
    parent that held a model (while quantizing it) would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e6


def child(args: argparse.Namespace) -> None:
    target = Path(args.target)
    out = run_llamacpp(target, args) if target.suffix == ".gguf" else run_ours(target, args)
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
            keep = RECIPES["mixed"] if ":mixed" in label else ()
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


def measure(target: Path, tokenizer_dir: Path, reference: Path, args: argparse.Namespace) -> dict | None:
    """One setting in its own process; the first one (ours fp32) writes the reference log-probs."""
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
        "--reference",
        str(reference),
        *(["--write-reference"] if target == tokenizer_dir else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"  {target}: failed\n{proc.stderr[-1500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(name: str, results: dict[str, dict]) -> None:
    print(f"\n### {name}\n")
    print(
        "| setting | weight MB | peak RSS MB | decode tok/s | prefill tok/s | perplexity | vs fp32 (95% interval) "
        "| KL to fp32 | same top-1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in results.items():
        quality = ""
        if "kl" in m:
            low, high = m["ppl_change_ci"]
            change = m["ppl"] / results["ours fp32"]["ppl"] - 1 if "ours fp32" in results else math.nan
            interval = f"{100 * change:+.2f}% ({100 * low:+.2f}..{100 * high:+.2f})"
            quality = f"{interval} | {m['kl']:.4f} | {100 * m['top1']:.1f}%"
        print(
            f"| {label} | {m['weight_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['decode_tps']:.1f} | "
            f"{m['prefill_tps']:.1f} | {m['ppl']:.3f} | {quality or ' | |'} |"
        )
    pairs = (
        ("ours int4", "llama.cpp Q4_K_M"),
        ("ours int4", "llama.cpp Q4_1"),  # the same 5 bits per weight: 4-bit codes, fp16 scale and offset per 32
        ("ours int4:mixed", "llama.cpp Q4_K_M"),
        ("ours int4-gptq", "llama.cpp Q4_K_M"),
        ("ours int4:mixed-gptq", "llama.cpp Q4_K_M"),
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
    ap.add_argument("--no-gptq", action="store_true", help="skip the GPTQ settings (calibration takes minutes)")
    ap.add_argument("--work", default=None, help="where quantized weights are kept (default: <cache>/bench-quant)")
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--write-reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.target:
        return child(args)
    from lmforge.paths import cache_dir

    print(f"threads {torch.get_num_threads()}; perplexity windows {WINDOW}/{STRIDE} on lmforge's held-out text")
    for name in args.models.split(","):
        print(f"\n{name}: preparing", flush=True)
        work = Path(args.work).expanduser() / name if args.work else cache_dir() / "bench-quant" / name
        source, settings = prepare(name, work, gptq=not args.no_gptq)
        results = {}
        for label, target in settings.items():
            if (m := measure(target, source, work / "reference-logprobs.npy", args)) is not None:
                results[label] = m
                print(f"  {label}: {m}", flush=True)
        report(name, results)


if __name__ == "__main__":
    main()
