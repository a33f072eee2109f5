"""Pretraining step speed of lmforge against Hugging Face transformers for the same model shape, in the same run.

    python bench/train.py [--steps 6] [--repeats 3] [--threads 2] [--device cpu|cuda] [--shape anchor|340m]

A step is forward, next-token cross-entropy, backward, gradient clipping and AdamW, the same for both. Each
runtime runs in its own subprocess (so peak RSS is its own), alternating, `--repeats` times; the report gives the
median tokens/s, the ratio ours / transformers, and MFU (6·N FLOPs per token over the device's peak) on GPU.
Shape "anchor" is NOTES.md's training anchor: Llama 6 layers / 384 / 6 heads / MLP 1024, vocab 8192, seq 256,
batch 8. litgpt (pip install litgpt lightning) and nanoGPT's model.py are not importable here; their CPU anchors
are in NOTES.md (1,110 and 1,131 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    "anchor": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                   num_kv_heads=6, max_seq_len=256, seq=256, batch=8),
    "340m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                 num_kv_heads=16, max_seq_len=2048, seq=2048, batch=8),
}


def _ours(shape: dict, device: str) -> tuple[torch.nn.Module, callable]:
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.train.loop import summed_loss

    cfg = ModelConfig(**{k: v for k, v in shape.items() if k not in ("seq", "batch")})
    model = Transformer(cfg).to(device)
    model.init_weights()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        total, n = summed_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, torch.device(device))
        return total / n

    return model, loss


def _hf(shape: dict, device: str) -> tuple[torch.nn.Module, callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=shape["max_seq_len"], tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None

    def loss(ids: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        with autocast:
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss

    return model, loss


def measure(runtime: str, shape_name: str, steps: int, device: str) -> dict:
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model, loss_fn = (_ours if runtime == "lmforge" else _hf)(shape, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"] + 1), device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    tokens = shape["batch"] * shape["seq"]
    n = sum(p.numel() for p in model.parameters())
    tok_s = tokens / statistics.median(times[1:])
    result = {"runtime": runtime, "tok_s": tok_s, "params": n, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        from lmforge.plan import PEAK_FLOPS

        result["mfu"] = tok_s * 6 * n / PEAK_FLOPS["h100"]
        result["gpu"] = torch.cuda.get_device_name()
    return result


def _child(runtime: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", runtime, "--steps", str(args.steps), "--threads", str(args.threads),
           "--device", args.device, "--shape", args.shape]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default="anchor")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.shape, args.steps, args.device)))
        return
    runs: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(_child(name, args))
    print(f"shape {args.shape} {SHAPES[args.shape]}, device {args.device}, threads {args.threads}, "
          f"{args.steps} timed steps x {args.repeats} repeats (medians)")
    med = {name: statistics.median(r["tok_s"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        extra = f"  MFU {statistics.median(r['mfu'] for r in rs):.1%}" if "mfu" in rs[0] else ""
        print(f"{name:13s} {med[name]:10,.0f} tok/s  {rs[0]['params'] / 1e6:6.1f}M params  "
              f"peak RSS {max(r['peak_rss_mb'] for r in rs):,.0f} MB{extra}")
    print(f"ratio lmforge / transformers: {med['lmforge'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
