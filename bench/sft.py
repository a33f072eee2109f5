"""Instruction-tuning speed and memory of lmforge's methods beside PEFT + transformers, and forgetting.

    python bench/sft.py [--models smollm2-135m-instruct] [--configs lora,peft-lora] [--steps 4] [--rounds 2]
    python bench/sft.py --forgetting [--forget-steps 30] [--mix]

Speed: every configuration runs in its own subprocess (so its peak RSS is its own) on the same token rows: the
shipped instruction and self-cognition sets, chat-templated by the model's template with the loss on assistant
tokens only, concatenated and cut into rows of `--seq` tokens. A step is forward + backward + clipping + AdamW,
the first one a warm-up; tokens/s counts every input token (B x T) over the median measured step, in wall time and
in the process's CPU time (which, at one thread, stays the measure of work done when other jobs share the cores).
- ours: full / LoRA / QLoRA (LoRA over the INT4 base) / P-Tuning v2, stepped by the shared training loop's own
  `accumulate` (lmforge.train.loop), the code `lmforge sft` runs;
- peer: transformers `AutoModelForCausalLM` from the same checkpoint directory, with PEFT's LoRA (same rank, alpha,
  dropout and targets) or fully trainable, the same cross-entropy, clipping and AdamW.
Forgetting (`--forgetting`): perplexity on the shipped bilingual held-out text before and after a short
`lmforge sft` run with each method on the shipped instruction sets (same steps, batch, seed), and with
`--mix` also with the shipped calibration text (disjoint from the held-out text) mixed in at 25%.
Runs on CPU unless a GPU is present.
This script does not tune hyperparameters; it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OURS = ("full", "lora", "qlora", "ptuning")
PEERS = ("peft-lora", "hf-full")
RANK, ALPHA, DROPOUT = 8, 16.0, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_rows(directory: Path, seq: int, rows: int) -> dict[str, torch.Tensor]:
    """input_ids and targets (rows, seq) from the shipped instruction sets, assistant-only loss, repeated to fill."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.train import sft_data
    from lmforge.train.loop import IGNORE

    tok = Tokenizer.load(directory)
    files = [sft_data.resolve_data(f"builtin:{n}") for n in ("instructions", "self-cognition")]
    stats = sft_data.DataStats()
    examples = sft_data.load_examples(files, tok, 4096, "truncate", "stop", {"NAME": "Forge", "AUTHOR": "us"}, stats)
    ids = [i for e in examples for i in e.ids]
    keep = [k for e in examples for k in e.labels]
    need = rows * (seq + 1)
    ids, keep = (ids * (need // len(ids) + 1))[:need], (keep * (need // len(keep) + 1))[:need]
    x = torch.tensor(ids).view(rows, seq + 1)
    mask = torch.tensor(keep).view(rows, seq + 1)
    targets = torch.where(mask[:, 1:], x[:, 1:], torch.full_like(x[:, 1:], IGNORE))
    return {"input_ids": x[:, :-1].contiguous(), "targets": targets.contiguous()}


# --- children: one configuration each ----------------------------------------------------------------------------


def _ours(directory: Path, method: str) -> tuple[torch.nn.Module, object]:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.sft import SFTConfig, prepare_model

    model, _ = load_checkpoint(directory)
    cfg = SFTConfig(data=[], out="", method=method, lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                    progress=False)
    prepare_model(cfg, model)
    from lmforge.train.loop import accumulate

    return model, lambda batch: accumulate(model, [batch], torch.device("cpu"))


def _peer(directory: Path, method: str) -> tuple[torch.nn.Module, object]:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lmforge.train.loop import IGNORE

    model = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none")
        model = get_peft_model(model, lora)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        targets = batch["targets"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss / max(int((targets != IGNORE).sum()), 1)).backward()

    return model, step


def child(args: argparse.Namespace) -> None:
    directory = Path(args.target)
    torch.manual_seed(0)
    data = token_rows(directory, args.seq, args.batch * (args.steps + 1))
    model, step = (_ours if args.child in OURS else _peer)(directory, args.child)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, cpu = [], []
    for s in range(args.steps + 1):
        batch = {k: v[s * args.batch : (s + 1) * args.batch] for k, v in data.items()}
        t, c = time.perf_counter(), time.process_time()
        step(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out = {
        "tok_s": args.batch * args.seq / statistics.median(times[1:]),
        "tok_cpu_s": args.batch * args.seq / statistics.median(cpu[1:]),
        "first_step_s": times[0],
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    }
    print(json.dumps(out))


def measure(directory: Path, config: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", config, "--target", str(directory), "--steps", str(args.steps),
           "--seq", str(args.seq), "--batch", str(args.batch)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {config} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace) -> None:
    from lmforge.catalog import resolve_model

    for name in args.models.split(","):
        directory = resolve_model(name)
        print(f"\n{name}: seq {args.seq}, batch {args.batch}, {args.steps} measured steps after 1 warm-up, "
              f"{torch.get_num_threads()} threads, fp32 CPU; LoRA r={RANK} alpha={ALPHA:g} dropout {DROPOUT} on all "
              "linears", flush=True)
        runs: dict[str, list[dict]] = {c: [] for c in args.configs.split(",")}
        for round_ in range(args.rounds):  # rounds interleave the configurations, so load drifts hit them alike
            for config in runs:
                r = measure(directory, config, args)
                if r:
                    runs[config].append(r)
                    print(f"  {config:10s} {r['tok_s']:8.1f} tok/s ({r['tok_cpu_s']:6.1f} per CPU s)  peak RSS "
                          f"{r['peak_rss_mb']:7.0f} MB  trainable {r['trainable_m']:.2f} M  first step "
                          f"{r['first_step_s']:.1f} s  (round {round_ + 1})", flush=True)
        _ratios({c: _median(rs) for c, rs in runs.items()})


def _median(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    return {key: statistics.median(r[key] for r in runs) for key in ("tok_s", "tok_cpu_s", "peak_rss_mb")}


def _ratios(results: dict[str, dict | None]) -> None:
    pairs = [("lora", "peft-lora"), ("qlora", "peft-lora"), ("full", "hf-full"), ("ptuning", "peft-lora")]
    for ours, peer in pairs:
        a, b = results.get(ours), results.get(peer)
        if a and b:
            print(f"  {ours} / {peer} (medians): tokens/s x{a['tok_s'] / b['tok_s']:.2f}, per CPU second "
                  f"x{a['tok_cpu_s'] / b['tok_cpu_s']:.2f}, peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")


# --- forgetting --------------------------------------------------------------------------------------------------


def perplexity(model: str, quant: str | None, adapter: str | None) -> dict:
    from lmforge.eval.perplexity import PerplexityConfig, main

    result = main(PerplexityConfig(model=model, quant=quant, adapter=adapter, text="heldout", progress=False))
    return {t["name"]: t["perplexity"] for t in result["texts"]} | {"total": result["total"]["perplexity"]}


def forgetting(args: argparse.Namespace) -> None:
    from lmforge.eval.perplexity import resolve_texts
    from lmforge.train.sft import SFTConfig, main

    name = args.models.split(",")[0]
    calib = resolve_texts("heldout")[0].with_name("calib_bilingual.txt")  # general text, disjoint from held-out
    mixes = (False, True) if args.mix else (False,)
    print(f"\n{name}: perplexity on the shipped held-out text (en, zh) before/after {args.forget_steps} SFT steps "
          f"(batch {args.batch}, max len {args.seq}, default lr per method) on instructions + self-cognition")
    base = perplexity(name, None, None)
    print(f"  {'base':22s} {_ppl(base)}", flush=True)
    base_q = perplexity(name, "int4", None)
    print(f"  {'base int4 (QLoRA base)':22s} {_ppl(base_q)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mix in mixes:
            for method in OURS:
                out = Path(tmp) / f"{method}-{mix}"
                cfg = SFTConfig(data=["builtin:instructions", "builtin:self-cognition"], out=str(out), model=name,
                                method=method, max_steps=args.forget_steps, batch_size=args.batch, max_len=args.seq,
                                mix_data=[str(calib)] if mix else [], mix_ratio=0.25 if mix else 0.0,
                                eval_every=0, save_every=0, progress=False)
                t = time.perf_counter()
                result = main(cfg)
                took = time.perf_counter() - t
                after = (perplexity(str(out / "model"), None, None) if method == "full"
                         else perplexity(name, "int4" if method == "qlora" else None, str(out)))
                label = f"{method}{' + mix 25%' if mix else ''}"
                print(f"  {label:22s} {_ppl(after)}  sft loss {result['first_loss']:.2f} -> {result['last_loss']:.2f}"
                      f"  ({took:.0f} s)", flush=True)


def _ppl(scores: dict) -> str:
    return "  ".join(f"{k} {v:7.2f}" for k, v in scores.items() if not math.isnan(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct")
    parser.add_argument("--configs", default=",".join(OURS + PEERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration, report medians")
    parser.add_argument("--forgetting", action="store_true")
    parser.add_argument("--forget-steps", type=int, default=30)
    parser.add_argument("--mix", action="store_true", help="forgetting also with general text mixed in")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.forgetting:
        forgetting(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
