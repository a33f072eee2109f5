"""What every fine-tuning stage does alike (`sft`, `rm train`, `dpo`): load the base, make the method's layers
trainable, set the loop's schedule, save the adapter or model, and sum up the run from its log.

The settings themselves are `train.settings.FinetuneSettings`, kept apart so the CLI can read them without torch.
This module does not read data or define losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.train.loop import TrainConfig, read_log
from lmforge.train.lora import LoraConfig
from lmforge.train.settings import FinetuneSettings

if TYPE_CHECKING:
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer


def device_of(settings: FinetuneSettings) -> str:
    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_base(settings: FinetuneSettings) -> tuple[Transformer, Tokenizer, Path]:
    """The base model (float), its tokenizer and its checkpoint directory."""
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint

    base_dir = resolve_model(settings.model, progress=settings.progress)
    model, tokenizer = load_checkpoint(base_dir, device=device_of(settings))
    return model, tokenizer, base_dir


def apply_method(settings: FinetuneSettings, model: torch.nn.Module) -> LoraConfig | None:
    """Make full / LoRA / QLoRA parameters trainable in place; returns the LoRA settings, None for full."""
    if settings.method == "full":
        model.requires_grad_(True)
        return None
    from lmforge.train.lora import apply_lora

    if settings.method == "qlora":
        from lmforge.quant import QuantScheme, quantize_

        quantize_(model, QuantScheme.parse(settings.quant), progress=settings.progress)
    lora = LoraConfig(settings.lora_rank, settings.lora_alpha, settings.lora_dropout, tuple(settings.lora_targets))
    apply_lora(model, lora)
    return lora


def steps_for(settings: FinetuneSettings, n_train: int) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    return max(1, round(settings.epochs * n_train / (settings.batch_size * settings.grad_accum)))


def loop_config(settings: FinetuneSettings, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        lr=lr,
        min_lr_ratio=settings.min_lr_ratio,
        warmup_steps=round(settings.warmup_ratio * steps),
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        eval_every=settings.eval_every,
        save_every=settings.save_every,
        keep_last=settings.keep_last,
        progress=settings.progress,
    )


def final_metrics(out: Path, extra: tuple[str, ...] = ()) -> dict:
    """First and last training loss, held-out loss before and after (and the `extra` held-out metrics), median
    tokens/s, from the run's log."""
    log = read_log(out)
    evals = [r for r in log if "eval_loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    tok_s = sorted(r["tok_s"] for r in log if "tok_s" in r)
    metrics = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    for key in ("eval_loss", *extra):
        if evals and key in evals[0]:
            metrics |= {f"{key}_before": evals[0][key], f"{key}_after": evals[-1][key]}
    if tok_s:
        metrics["median_tok_s"] = tok_s[len(tok_s) // 2]
    return metrics


def save_result(
    settings: FinetuneSettings,
    out: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    base_dir: Path,
    adapter: object | None,
    lineage: dict,
) -> str:
    """Write lineage.json, then the adapter (adapter is its settings) or the full model under out/model; returns
    the command that chats with the result."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.fileio import write_json
    from lmforge.train.adapters import save_adapter

    write_json(out / "lineage.json", lineage)
    if adapter is None:
        save_checkpoint(out / "model", model.cfg, model.state_dict(), tokenizer, lineage)
        return f"lmforge chat --model {out / 'model'}"
    base = {"name": settings.model or base_dir.parent.name, "source": str(base_dir)}
    quant = settings.quant if settings.method == "qlora" else None
    save_adapter(model, out, settings.method, adapter, base, quant=quant)
    return f"lmforge chat --model {base['name']}{f' --quant {quant}' if quant else ''} --adapter {out}"
