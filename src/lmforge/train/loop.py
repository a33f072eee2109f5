"""The training loop every lmforge stage shares (instruction tuning and pretraining).

What it does, for any model whose trainable parameters have `requires_grad` set:
- AdamW with two weight-decay groups (matrices decay; biases, norm weights and other vectors do not), linear
  warmup then cosine decay to `min_lr_ratio * lr` (or warmup-stable-decay, "wsd"), gradient accumulation over
  micro-batches, norm clipping;
- next-token cross-entropy over `targets` (IGNORE where no loss applies), averaged over the step's targets, so a
  step means the same whatever the split into micro-batches; bf16 autocast on CUDA, plain fp32 elsewhere;
- a progress bar (loss, lr, tokens/s), a JSONL log, held-out loss every `eval_every` steps, a loss-curve PNG;
- a checkpoint every `save_every` steps, written atomically, keeping the last `keep_last`: the trainable tensors,
  the optimizer's moments and the RNG states as safetensors, the step and counters as JSON (never a pickle).
Exact resume: data comes from `batches(step)`, a pure function of the step number, so restoring the step, the
trainable tensors, the optimizer state and the RNG state continues the same run bit for bit on the same machine.
Self-healing (optional, train/healing.py): a NaN or spiking loss is caught before the optimizer step, the run rolls
back to the last checkpoint, skips the offending data and may cool the learning rate down; every event is logged.
Distributed runs pass a `Runtime` (train/distributed.py) that averages across ranks and saves sharded state.
It does not build models, read data files or decide what to save at the end; the stage calling it does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from lmforge.fileio import atomic_dir, atomic_path, write_json, write_text
from lmforge.progress import step_progress

if TYPE_CHECKING:
    from lmforge.train.healing import Healer

IGNORE = -100
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
Batch = dict[str, Tensor]  # input_ids (B, T) and targets (B, T)
CHECKPOINT = re.compile(r"step-(\d+)")


@dataclass
class TrainConfig:
    max_steps: int
    lr: float
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 0  # 0 = evaluate only before and after training
    save_every: int = 0  # 0 = checkpoint only at the end
    keep_last: int = 2
    progress: bool = True
    schedule: str = "cosine"  # or "wsd": warmup, constant, then linear decay over the last decay_ratio of steps
    decay_ratio: float = 0.2
    flops_per_token: float = 0.0  # with peak_flops, logs model FLOPs utilisation (MFU)
    peak_flops: float = 0.0
    bytes_per_token: float = 0.0  # of the held-out text; logs bits per byte beside the held-out loss
    warm_allocator: bool = False  # keep freed pages while training (see warm_allocator); pretraining turns it on


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine (or WSD) to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.decay_ratio * cfg.max_steps))
        into = step - (cfg.max_steps - decay)
        return cfg.lr if into < 0 else cfg.lr - (cfg.lr - floor) * min(1.0, (into + 1) / decay)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass (CPU and CUDA); the default loops over tensors in Python,
    # ~10 small kernels each, which costs a few percent of a small model's step.
    fused = all(p.device.type in ("cpu", "cuda") for p in params.values())
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused)


@contextlib.contextmanager
def warm_allocator() -> Iterator[None]:
    """While training, let glibc's malloc keep the memory a step frees, instead of handing it back to the kernel.

    By default every block over ~128 KiB to 32 MiB is a fresh mmap: each step's activations are then faulted in and
    zeroed page by page again (~100k page faults and ~10% of a small model's CPU step here). Without mmap and with a
    high trim threshold, step 2 onwards reuses step 1's pages. The defaults come back on exit and the surplus is
    trimmed, so later stages in the same process start lean. Elsewhere (no glibc) this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        trim(0)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast only where the hardware has bf16 matmul; this kind of CPU computes bf16 ~500x slower than fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (N,) of (N, V) logits against (N,) targets, worked in row chunks, whose backward turns
    the logits into their own gradient in place: one (N, V) tensor at the peak instead of four (logits, log-softmax,
    and the gradients of both). Only for logits that nothing else reads afterwards, as a head's fresh output; were
    they saved elsewhere for backward, autograd's version check would refuse the in-place write, not miscompute.
    Per token rather than summed so that preference losses can weigh each sequence's tokens by that sequence's own
    gradient; a sum over it costs nothing more."""

    ROWS = 64  # (64, V) temporaries: ~12 MB at SmolLM2's vocabulary, ~39 MB at Qwen's

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = torch.cat([torch.logsumexp(rows, dim=-1) for rows in logits.split(_TokenCrossEntropy.ROWS)])  # (N,)
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(1, targets[:, None]).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        rows = _TokenCrossEntropy.ROWS
        for chunk, chunk_lse, chunk_grad in zip(logits.split(rows), lse.split(rows), grad.split(rows), strict=True):
            chunk.sub_(chunk_lse[:, None]).exp_().mul_(chunk_grad[:, None])  # grad * softmax
        logits[torch.arange(len(targets), device=logits.device), targets] -= grad  # minus grad * one-hot
        return logits, None


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """-log p(target) per row of (N, V) logits, in float32 (a fresh copy under bf16 autocast, free to overwrite)."""
    return _TokenCrossEntropy.apply(logits.float(), targets)


def summed_loss(model: nn.Module, batch: Batch, device: torch.device) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropy over the batch's targets, and how many targets there were."""
    ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
    read = targets != IGNORE  # the head runs only where a target is read: about half the tokens in SFT
    with autocast_for(device):
        logits = model(ids, keep=read)  # (N, V)
    return token_nll(logits, targets[read]).sum(), int(read.sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> float:
    """Mean per-target loss over held-out batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = summed_loss(model, batch, device)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


# --- checkpoints --------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_state(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict) -> None:
    """One resumable checkpoint: trainable tensors, optimizer moments + RNG, counters and optimizer groups."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    moments = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    with atomic_dir(directory) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable(model).items()}
        save_file(weights, tmp / "trainable.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in (moments | _rng_state()).items()}, tmp / "optimizer.safetensors")
        write_json(tmp / "state.json", {**counters, "param_groups": sd["param_groups"]})


def load_state(directory: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore what save_state wrote; returns the counters."""
    from safetensors.torch import load_file

    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    params = trainable(model)
    with torch.no_grad():
        for name, t in load_file(str(directory / "trainable.safetensors")).items():
            params[name].copy_(t)
    device = next(iter(params.values())).device
    tensors = load_file(str(directory / "optimizer.safetensors"))
    moments: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, index, field = key.split(".", 2)
            moments.setdefault(int(index), {})[field] = t if field == "step" else t.to(device)
    opt.load_state_dict({"state": moments, "param_groups": state.pop("param_groups")})
    _set_rng_state(tensors)
    return state


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a killed write leaves only a hidden temporary, never a step-N)."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def _prune(run_dir: Path, keep: int) -> None:
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (run_dir / "checkpoints").glob(".step-*"):  # leftovers of a write that was killed
        shutil.rmtree(tmp, ignore_errors=True)


# --- log and plot -------------------------------------------------------------------------------------------------


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# Held-out pair accuracies of the preference stages, drawn beside the loss when a log has them.
ACCURACIES = ("eval_accuracy", "eval_rewards/accuracy")


def plot_losses(run_dir: Path) -> None:
    """loss.png: training loss per step and held-out loss, from log.jsonl (and held-out pair accuracy, if logged)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    log = read_log(run_dir)
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    accuracy = [(r["step"], r[k]) for r in log for k in ACCURACIES if k in r]
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(12 if accuracy else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out", linewidth=1.5)
    ax.set(xlabel="step", ylabel="loss", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if accuracy:
        right = axes[0][1]
        right.plot(*zip(*accuracy, strict=True), "o-", color="tab:green", linewidth=1.5)
        right.set(xlabel="step", ylabel="held-out pair accuracy", ylim=(0, 1.02), title="chosen ranked above rejected")
        right.grid(alpha=0.3)
    with atomic_path(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """How the loop meets its process group. The default is one process; train/distributed.py makes the torchrun one."""

    world: int = 1
    is_main: bool = True  # only the main rank writes the log, the plot and the progress bar
    mean: Callable[[float], float] = float  # average of a per-rank value over all ranks
    save: Callable[[Path, nn.Module, torch.optim.Optimizer, dict], None] = save_state
    load: Callable[[Path, nn.Module, torch.optim.Optimizer], dict] = load_state
    barrier: Callable[[], None] = lambda: None


def _cut_log(run_dir: Path, step: int) -> None:
    """Forget training records past `step` (they will be redone); healing events stay as the run's history."""
    kept = [r for r in read_log(run_dir) if r["step"] <= step or "event" in r]
    write_text(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def _resume(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime) -> dict:
    """Counters of the latest checkpoint (after loading it), with the log cut back to that step."""
    found = checkpoints(run_dir)
    if not found:
        return {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    counters = rt.load(found[-1], model, opt)
    if rt.is_main:
        _cut_log(run_dir, counters["step"])
    return counters


def accumulate(model: nn.Module, micro: list[Batch], device: torch.device) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches; gradients are of the step's mean per-target loss."""
    count = sum(int((b["targets"] != IGNORE).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        loss, _ = summed_loss(model, batch, device)
        (loss / max(count, 1)).backward()
        total += float(loss.detach())
    return total / max(count, 1), sum(b["input_ids"].numel() for b in micro)


class Objective(Protocol):
    """What a stage trains for. The loop owns the schedule, optimizer, checkpoints and log; the objective owns the
    forward and backward of one step and what is measured on held-out data."""

    def step(self, model: nn.Module, micro: list[Batch], device: torch.device) -> tuple[float, int, dict[str, float]]:
        """Forward and backward over one step's micro-batches (gradients of the step's loss): (loss, tokens seen,
        other metrics to log)."""
        ...

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        """Held-out metrics in eval mode without gradients; `eval_loss` among them."""
        ...


class NextToken:
    """Next-token cross-entropy over the batches' targets: pretraining and instruction tuning."""

    def step(self, model: nn.Module, micro: list[Batch], device: torch.device) -> tuple[float, int, dict[str, float]]:
        loss, tokens = accumulate(model, micro, device)
        return loss, tokens, {}

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        return {"eval_loss": evaluate(model, batches)}


def train(
    model: nn.Module,
    batches: Callable[[int], list[Batch]],
    held_out: list[Batch],
    cfg: TrainConfig,
    run_dir: Path,
    label: str = "training",
    healer: Healer | None = None,
    runtime: Runtime | None = None,
    objective: Objective | None = None,
) -> dict:
    """Run (or continue, if run_dir holds checkpoints) until cfg.max_steps; returns the final counters.

    objective: the loss and held-out metrics (default: next-token cross-entropy)."""
    rt = runtime or Runtime()
    objective = objective or NextToken()
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    rt.barrier()
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    counters = _resume(run_dir, model, opt, rt)
    params = list(trainable(model).values())
    if counters["step"] == 0:
        if held_out:
            _log(run_dir, rt, _eval_record(0, model, held_out, cfg, objective))
        if healer is not None:  # a rollback needs a good state to return to
            _save(run_dir, model, opt, counters, cfg, rt)
    model.train()
    allocator = warm_allocator() if cfg.warm_allocator else contextlib.nullcontext()
    with allocator, step_progress(label, cfg.max_steps, counters["step"], cfg.progress and rt.is_main) as update:
        while counters["step"] < cfg.max_steps:
            step = counters["step"]
            t0 = time.perf_counter()
            lr = lr_at(step, cfg) * (healer.lr_scale(counters) if healer else 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            data_step = healer.data_step(step, counters) if healer else step
            loss, tokens, metrics = objective.step(model, batches(data_step), device)
            loss, tokens = rt.mean(loss), tokens * rt.world
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
            problem = healer.check(loss, norm, counters) if healer else None
            if problem:
                opt.zero_grad(set_to_none=True)
                counters = _roll_back(run_dir, model, opt, counters, healer, problem | {"data_step": data_step}, rt)
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            counters = counters | {
                "step": step + 1,
                "tokens": counters["tokens"] + tokens,
                "elapsed_s": counters["elapsed_s"] + dt,
            }
            if healer:
                counters = healer.observe(loss, counters)
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens}
            record |= {k: rt.mean(v) for k, v in metrics.items()} | _speed(tokens, dt, cfg)
            done = step + 1 == cfg.max_steps
            if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                record |= _eval_record(step + 1, model, held_out, cfg, objective)
            _log(run_dir, rt, record)
            if rt.is_main:
                update(step + 1, f"loss {loss:.3f}  lr {lr:.2e}  {tokens / dt:,.0f} tok/s")
            if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                _save(run_dir, model, opt, counters, cfg, rt)
    if rt.is_main:
        plot_losses(run_dir)
    model.eval()
    return counters


def _speed(tokens: int, dt: float, cfg: TrainConfig) -> dict:
    speed = {"tok_s": round(tokens / dt, 1)}
    if cfg.flops_per_token and cfg.peak_flops:
        speed["mfu"] = round(tokens * cfg.flops_per_token / dt / cfg.peak_flops, 4)
    return speed


def _eval_record(step: int, model: nn.Module, held_out: list[Batch], cfg: TrainConfig, objective: Objective) -> dict:
    record = {"step": step, **objective.evaluate(model, held_out)}
    if cfg.bytes_per_token:
        record["eval_bpb"] = record["eval_loss"] / math.log(2) / cfg.bytes_per_token  # nats/token -> bits/byte
    return record


def _log(run_dir: Path, rt: Runtime, record: dict) -> None:
    if rt.is_main:
        _append_log(run_dir, record)


def _save(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict, cfg: TrainConfig,
          rt: Runtime) -> None:
    rt.save(run_dir / "checkpoints" / f"step-{counters['step']:08d}", model, opt, counters)
    rt.barrier()
    if rt.is_main:
        _prune(run_dir, cfg.keep_last)
    rt.barrier()


def _roll_back(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict, healer: Healer,
               problem: dict, rt: Runtime) -> dict:
    """Return to the last checkpoint, keeping the healing history (skipped data, rollbacks) that led here."""
    kept = healer.after_problem(counters, problem)  # raises once the rollbacks are used up
    restored = rt.load(checkpoints(run_dir)[-1], model, opt)
    if rt.is_main:
        _cut_log(run_dir, restored["step"])
        _append_log(run_dir, {"step": counters["step"] + 1, "event": problem.pop("reason"), **problem,
                              "rolled_back_to": restored["step"]})
    return restored | kept
