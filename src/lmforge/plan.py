"""`lmforge plan`: how big a model, how many tokens, how much memory and how long, before spending the compute.

Compute-optimal size follows Chinchilla (Hoffmann et al. 2022, approach 1 and 2): training costs C = 6·N·D FLOPs
for N parameters and D tokens, and the loss-optimal split keeps D ≈ 20·N, so N = sqrt(C / 120) and D = 20·N.
Memory per device for mixed-precision AdamW training is 16 bytes per parameter (fp32 weights 4, gradients 4, two
moments 8), divided by the ranks under FSDP (full sharding), plus activations (Korthikanti et al. 2022: about
34·s·b·h bytes per layer in 16-bit once attention runs fused (SDPA) and stores no s×s scores, or 2·s·b·h bytes per
layer kept with activation checkpointing; twice that in fp32), plus the fp32 logits and their gradient.
Wall time is tokens over throughput: measured tokens/s when given, else peak FLOP/s × MFU / 6N.
It does not measure anything; `bench/train.py` and the pretrain log give the measured throughput to feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

TOKENS_PER_PARAM = 20.0
ADAM_BYTES_PER_PARAM = 16
# Dense peak FLOP/s per device: bf16 tensor cores for GPUs (vendor sheets), fp32 GEMM measured for this CPU.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "rtx4090": 165e12, "cpu": 150e9}


def n_params(cfg: ModelConfig) -> int:
    """Parameter count of our Transformer for this config (tied head counted once)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if cfg.qkv_bias else 0)
    block = attn + 3 * h * cfg.intermediate_size + 2 * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + cfg.num_layers * block + h + head


def compute_optimal(flops: float) -> tuple[float, float]:
    """(parameters, tokens) that minimise loss for `flops` training FLOPs under C = 6ND, D = 20N."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def activation_bytes(cfg: ModelConfig, batch: int, seq: int, checkpointing: bool, half: bool) -> float:
    s, b, h = seq, batch, cfg.hidden_size
    per_layer = 2 * s * b * h if checkpointing else 34 * s * b * h
    logits = s * b * cfg.vocab_size * 4 * 2  # fp32 logits and their gradient
    return (per_layer * cfg.num_layers) * (1 if half else 2) + logits


def memory_per_device(cfg: ModelConfig, batch: int, seq: int, world: int = 1, strategy: str = "ddp",
                      checkpointing: bool = False, half: bool = False) -> float:
    """Bytes one device needs to train: sharded (fsdp) or replicated (ddp/none) AdamW state plus activations."""
    state = ADAM_BYTES_PER_PARAM * n_params(cfg) / (world if strategy == "fsdp" else 1)
    return state + activation_bytes(cfg, batch, seq, checkpointing, half)


@dataclass
class PlanRequest:
    compute: float = 0.0  # training FLOPs
    gpu_hours: float = 0.0
    gpu: str = "h100"
    params: float = 0.0
    mfu: float = 0.4  # expected model FLOPs utilisation when no measured throughput is given
    tok_s: float = 0.0  # measured tokens/s per device (bench/train.py or a pretrain log)
    devices: int = 1


def plan(req: PlanRequest) -> dict:
    """Compute-optimal parameters and tokens, and the time they take on `devices` of `gpu`."""
    if req.gpu not in PEAK_FLOPS:
        raise LmforgeError(f"--gpu {req.gpu!r}: choose one of {', '.join(PEAK_FLOPS)}")
    peak = PEAK_FLOPS[req.gpu]
    if req.compute:
        flops = req.compute
    elif req.gpu_hours:
        flops = req.gpu_hours * 3600 * peak * req.mfu
    elif req.params:
        flops = 6 * req.params * TOKENS_PER_PARAM * req.params
    else:
        raise LmforgeError("lmforge plan: give --compute FLOPS, --gpu-hours H or --params N")
    n, d = (req.params, TOKENS_PER_PARAM * req.params) if req.params else compute_optimal(flops)
    tok_s = req.tok_s or peak * req.mfu / (6 * n)
    hours = d / (tok_s * req.devices) / 3600
    return {"flops": 6 * n * d, "params": n, "tokens": d, "tokens_per_param": d / n, "gpu": req.gpu,
            "devices": req.devices, "tok_s_per_device": tok_s, "wall_hours": hours, "gpu_hours": hours * req.devices}


def nearest_preset(params: float) -> str:
    """The named preset closest in parameter count (on a log scale)."""
    from lmforge.config import PRESETS

    return min(PRESETS, key=lambda name: abs(math.log(n_params(PRESETS[name]) / params)))


def format_plan(result: dict, cfg: ModelConfig | None = None, batch: int = 8, seq: int = 1024) -> str:
    lines = [
        f"compute        {result['flops']:.3e} FLOPs (6·N·D)",
        f"parameters     {result['params'] / 1e6:,.1f} M (nearest preset: {nearest_preset(result['params'])})",
        f"tokens         {result['tokens'] / 1e9:,.3f} B ({result['tokens_per_param']:.0f} per parameter)",
        f"throughput     {result['tok_s_per_device']:,.0f} tokens/s per {result['gpu']}",
        f"wall time      {result['wall_hours']:,.2f} h on {result['devices']} × {result['gpu']}"
        f" ({result['gpu_hours']:,.1f} device-hours)",
    ]
    if cfg is not None:
        for strategy in ("ddp", "fsdp"):
            gib = memory_per_device(cfg, batch, seq, result["devices"], strategy, half=result["gpu"] != "cpu") / 2**30
            lines.append(f"memory/device  {gib:,.2f} GiB with {strategy} (batch {batch} × {seq}, no act. ckpt)")
    return "\n".join(lines)
