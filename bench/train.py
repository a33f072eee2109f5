"""Pretraining step speed of lmforge beside its peers for the same model shape, in the same run.

    python bench/train.py [--steps 6] [--repeats 3] [--threads 2] [--device cpu|cuda] [--shape anchor|340m]
                          [--nanogpt PATH/TO/nanoGPT/model.py]

A step is forward, next-token cross-entropy, backward, gradient clipping and AdamW. Peers: Hugging Face
transformers (LlamaForCausalLM, SDPA), litgpt (`GPT` with its Llama MLP and RMSNorm, its `chunked_cross_entropy`)
and nanoGPT's model.py (GPT-2 shape at the same depth and width: LayerNorm, GELU MLP of 4x width, tied head; not a
package, so pass your copy with --nanogpt). Peers use PyTorch's default AdamW (fused on CUDA, as nanoGPT does).
lmforge uses what `lmforge pretrain` uses: loop.make_optimizer (fused AdamW) under loop.warm_allocator (glibc keeps
freed pages between steps; --plain-allocator measures without it). A peer that is not installed is skipped with a
note. Each runtime runs in its own subprocess (so peak RSS is its own), alternating, `--repeats` times; the report
gives median tokens/s, the ratio of ours to each peer and to the fastest, and MFU (6·N FLOPs per token over the
device's peak) on GPU. Shape "anchor" is NOTES.md's training anchor: Llama 6 layers / 384 / 6 heads / MLP 1024,
vocab 8192, seq 256, batch 8. litgpt 0.5.13 pins huggingface-hub<1.4, which would downgrade the hub library that
transformers 5 needs, so it is not in the `bench` extra: install it apart, e.g. `pip install --no-deps --target DIR
litgpt lightning lightning-utilities torchmetrics pytorch-lightning jsonargparse docstring_parser typeshed_client`,
and run with PYTHONPATH=DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

Step = tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer]
SHAPES = {
    "anchor": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                   num_kv_heads=6, max_seq_len=256, seq=256, batch=8),
    "340m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                 num_kv_heads=16, max_seq_len=2048, seq=2048, batch=8),
}


def _peer_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")


def _autocast(device: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _ours(shape: dict, device: str, args: argparse.Namespace) -> Step:
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.train.loop import TrainConfig, make_optimizer, summed_loss

    cfg = ModelConfig(**{k: v for k, v in shape.items() if k not in ("seq", "batch")})
    model = Transformer(cfg).to(device)
    model.init_weights()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        total, n = summed_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, torch.device(device))
        return total / n

    return model, loss, make_optimizer(model, TrainConfig(max_steps=1, lr=1e-4, weight_decay=0.1))


def _hf(shape: dict, device: str, args: argparse.Namespace) -> Step:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=shape["max_seq_len"], tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss

    return model, loss, _peer_optimizer(model, device)


def _litgpt(shape: dict, device: str, args: argparse.Namespace) -> Step:
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    cfg = Config(block_size=shape["max_seq_len"], vocab_size=shape["vocab_size"], padded_vocab_size=shape["vocab_size"],
                 n_layer=shape["num_layers"], n_head=shape["num_heads"], n_embd=shape["hidden_size"],
                 n_query_groups=shape["num_kv_heads"], rotary_percentage=1.0, parallel_residual=False, bias=False,
                 norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=shape["intermediate_size"])
    model = GPT(cfg).to(device)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return chunked_cross_entropy(model(ids[:, :-1]), ids[:, 1:])  # as litgpt's pretrain.py calls it

    return model, loss, _peer_optimizer(model, device)


def _nanogpt(shape: dict, device: str, args: argparse.Namespace) -> Step:
    spec = importlib.util.spec_from_file_location("nanogpt_model", args.nanogpt)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.GPTConfig(block_size=shape["max_seq_len"], vocab_size=shape["vocab_size"], n_layer=shape["num_layers"],
                           n_head=shape["num_heads"], n_embd=shape["hidden_size"], dropout=0.0, bias=False)
    model = module.GPT(cfg).to(device)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())[1]

    return model, loss, _peer_optimizer(model, device)


RUNTIMES = {"lmforge": _ours, "transformers": _hf, "litgpt": _litgpt, "nanogpt": _nanogpt}


def missing(runtime: str, args: argparse.Namespace) -> str | None:
    """Why a peer cannot run here, or None."""
    if runtime == "nanogpt":
        return None if args.nanogpt and Path(args.nanogpt).is_file() else "no --nanogpt PATH to its model.py"
    package = {"transformers": "transformers", "litgpt": "litgpt"}.get(runtime)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    return None


def _allocator(runtime: str, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """lmforge's loop trains under loop.warm_allocator (glibc keeps freed pages); --plain-allocator measures without."""
    if runtime != "lmforge" or args.plain_allocator:
        return contextlib.nullcontext()
    from lmforge.train.loop import warm_allocator

    return warm_allocator()


def measure(runtime: str, args: argparse.Namespace) -> dict:
    shape, device = SHAPES[args.shape], args.device
    torch.manual_seed(0)
    model, loss_fn, opt = RUNTIMES[runtime](shape, device, args)
    model.train()
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"] + 1), device=device)
    times = []
    with _allocator(runtime, args):
        for _ in range(args.steps + 1):  # the first step warms up allocators and kernels
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
           "--device", args.device, "--shape", args.shape, *(["--nanogpt", args.nanogpt] if args.nanogpt else []),
           *(["--plain-allocator"] if args.plain_allocator else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _report(args: argparse.Namespace, runs: dict[str, list[dict]], skipped: dict[str, str]) -> None:
    print(f"shape {args.shape} {SHAPES[args.shape]}, device {args.device}, threads {args.threads}, "
          f"{args.steps} timed steps x {args.repeats} repeats (medians)")
    med = {name: statistics.median(r["tok_s"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        extra = f"  MFU {statistics.median(r['mfu'] for r in rs):.1%}" if "mfu" in rs[0] else ""
        ratio = "" if name == "lmforge" else f"  lmforge / {name} {med['lmforge'] / med[name]:.2f}x"
        print(f"{name:13s} {med[name]:10,.0f} tok/s  {rs[0]['params'] / 1e6:6.1f}M params  "
              f"peak RSS {max(r['peak_rss_mb'] for r in rs):,.0f} MB{extra}{ratio}")
    for name, why in skipped.items():
        print(f"{name:13s} skipped: {why}")
    peers = {name: v for name, v in med.items() if name != "lmforge"}
    if peers:
        fastest = max(peers, key=peers.get)
        print(f"ratio lmforge / fastest peer ({fastest}): {med['lmforge'] / peers[fastest]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default="anchor")
    p.add_argument("--nanogpt", default=None, help="path to a copy of nanoGPT's model.py (skipped when absent)")
    p.add_argument("--peers", default=None, help="comma-separated peers to run beside lmforge (default: all)")
    p.add_argument("--plain-allocator", action="store_true", help="run lmforge without loop.warm_allocator")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    chosen = ["lmforge", *(args.peers.split(",") if args.peers else [n for n in RUNTIMES if n != "lmforge"])]
    skipped = {name: why for name in chosen if (why := missing(name, args))}
    runs: dict[str, list[dict]] = {name: [] for name in chosen if name not in skipped}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(_child(name, args))
    _report(args, runs, skipped)


if __name__ == "__main__":
    main()
