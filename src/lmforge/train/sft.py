"""`lmforge sft`: instruction tuning with full fine-tuning, LoRA, QLoRA or P-Tuning v2, in one stage.

main(cfg) loads the base model, turns the data files into chat-templated examples (sft_data), swaps in the
method's trainable layers (lora, ptuning; QLoRA quantizes the base first with lmforge.quant), runs the shared loop
(loop.train) and writes the result into the output directory:
  adapter.safetensors + adapter_config.json   LoRA / QLoRA / P-Tuning (use with --adapter OUT)
  model/                                      full fine-tuning: a complete checkpoint (use with --model OUT/model)
  run.json        the settings and data hashes that define this run (a resume must match them)
  lineage.json    base model lineage, data file hashes, command line, every setting, data counts, final metrics
  log.jsonl, loss.png, checkpoints/step-N/    from the loop
An output directory that holds another run is refused unless --resume (same run, continue) or --overwrite.
This module does not define the data formats (sft_data) or the training step (loop).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file, write_json
from lmforge.train import sft_data
from lmforge.train.loop import TrainConfig, read_log, train
from lmforge.train.lora import ALL_TARGETS, LoraConfig
from lmforge.train.ptuning import PtuningConfig

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

METHODS = ("full", "lora", "qlora", "ptuning")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "ptuning": 1e-2}
# Settings that may change between a run and its resume without making it a different run.
NOT_IDENTITY = ("resume", "overwrite", "progress", "device")


@dataclass
class SFTConfig:
    data: list[str]
    out: str
    model: str | None = None
    method: str = "lora"
    mix_data: list[str] = field(default_factory=list)  # general text mixed in against forgetting
    mix_ratio: float = 0.0  # fraction of training examples drawn from mix_data
    epochs: float = 3.0
    max_steps: int = 0  # 0 = derived from epochs
    lr: float | None = None  # None = the method's default (DEFAULT_LR)
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    overlong: str = "truncate"  # or "drop"
    bad_records: str = "stop"  # or "skip"
    packing: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    prefix_len: int = 16
    quant: str = "int4"  # the base's quantization for QLoRA
    name: str = "Forge"  # fills {{NAME}} in the data (the shipped self-cognition set uses it)
    author: str = "the lmforge team"  # fills {{AUTHOR}}
    eval_fraction: float = 0.05
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    device: str | None = None  # None = cuda when available, else cpu
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        choices = {"method": METHODS, "overlong": ("truncate", "drop"), "bad_records": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if not 0 <= self.mix_ratio < 1:
            raise LmforgeError(f"--mix-ratio {self.mix_ratio}: give a fraction in [0, 1)")
        if self.mix_ratio > 0 and not self.mix_data:
            raise LmforgeError("--mix-ratio needs --mix-data FILE (general text to mix in)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_len < 2:
            raise LmforgeError("--batch-size and --grad-accum must be at least 1, --max-len at least 2")
        if self.resume and self.overwrite:
            raise LmforgeError("--resume and --overwrite contradict each other; pass one")


# --- output directory ---------------------------------------------------------------------------------------------


def _identity(cfg: SFTConfig, data_hashes: dict[str, str]) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}
    return {"settings": settings, "data_sha256": data_hashes}


def prepare_out(cfg: SFTConfig, identity: dict) -> Path:
    """Create, reuse (--resume) or clear (--overwrite) the output directory; refuse to mix two runs."""
    out = Path(cfg.out).expanduser()
    run_file = out / "run.json"
    occupied = out.exists() and any(out.iterdir())
    if occupied and not run_file.is_file():
        raise LmforgeError(f"{out} is not empty and holds no lmforge run; choose a new or empty --out directory")
    if occupied and cfg.overwrite:
        shutil.rmtree(out)
    elif occupied and not cfg.resume:
        raise LmforgeError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    elif occupied:
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        diffs = _differences(recorded, identity)
        if diffs:
            raise LmforgeError(
                f"{out} holds a different run ({'; '.join(diffs[:3])}); resume with the same settings "
                "and data, or pass --overwrite to start over"
            )
    elif cfg.resume:
        raise LmforgeError(f"{out} holds no run to resume; drop --resume to start one")
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, identity)
    return out


def _differences(recorded: dict, current: dict) -> list[str]:
    diffs = []
    for key in sorted(set(recorded["settings"]) | set(current["settings"])):
        was, now = recorded["settings"].get(key), current["settings"].get(key)
        if was != now:
            diffs.append(f"{key}: {was!r} then, {now!r} now")
    if recorded["data_sha256"] != current["data_sha256"]:
        diffs.append("the data files' contents differ")
    return diffs


# --- model and data -----------------------------------------------------------------------------------------------


def _prepare_model(cfg: SFTConfig, model: torch.nn.Module) -> LoraConfig | PtuningConfig | None:
    """Make the method's parameters trainable (in place); returns the adapter settings, None for full."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return None
    if cfg.method == "ptuning":
        from lmforge.train.ptuning import apply_ptuning

        settings = PtuningConfig(prefix_len=cfg.prefix_len)
        apply_ptuning(model, settings)
        return settings
    from lmforge.train.lora import apply_lora

    if cfg.method == "qlora":
        from lmforge.quant import QuantScheme, quantize_

        quantize_(model, QuantScheme.parse(cfg.quant), progress=cfg.progress)
    settings = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
    apply_lora(model, settings)
    return settings


def _build_data(
    cfg: SFTConfig, tokenizer: Tokenizer, data: list[Path], general: list[Path], max_len: int
) -> tuple[list[sft_data.Example], list[sft_data.Example], sft_data.DataStats]:
    """(training examples, held-out examples, counts)."""
    stats = sft_data.DataStats()
    identity = {"NAME": cfg.name, "AUTHOR": cfg.author}
    examples = sft_data.load_examples(data, tokenizer, max_len, cfg.overlong, cfg.bad_records, identity, stats)
    train_set, held_out = sft_data.split_eval(examples, cfg.eval_fraction, cfg.seed)
    if cfg.mix_ratio > 0:
        before = len(train_set)
        pieces = sft_data.general_pieces(general, tokenizer, max_len)
        train_set = sft_data.mix(train_set, pieces, cfg.mix_ratio, cfg.seed)
        stats.general_pieces = len(train_set) - before
    if cfg.packing:
        train_set = sft_data.pack(train_set, max_len)
    return train_set, held_out, stats


def _steps(cfg: SFTConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, round(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


# --- the stage ----------------------------------------------------------------------------------------------------


def _loop_config(cfg: SFTConfig, steps: int) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        lr=cfg.lr or DEFAULT_LR[cfg.method],
        min_lr_ratio=cfg.min_lr_ratio,
        warmup_steps=round(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
        keep_last=cfg.keep_last,
        progress=cfg.progress,
    )


def main(cfg: SFTConfig) -> dict:
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint, make_lineage, read_lineage, save_checkpoint
    from lmforge.train.adapters import save_adapter

    cfg.validate()
    data = [sft_data.resolve_data(d) for d in cfg.data]
    general = [sft_data.resolve_data(d) for d in cfg.mix_data]
    hashes = {str(p): sha256_file(p) for p in data + general}
    out = prepare_out(cfg, _identity(cfg, hashes))
    base_dir = resolve_model(cfg.model, progress=cfg.progress)
    model, tokenizer = load_checkpoint(base_dir, device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_len = min(cfg.max_len, model.cfg.max_seq_len - (cfg.prefix_len if cfg.method == "ptuning" else 0))
    train_set, held_out, stats = _build_data(cfg, tokenizer, data, general, max_len)

    torch.manual_seed(cfg.seed)  # adapter init and dropout
    settings = _prepare_model(cfg, model)
    steps = _steps(cfg, len(train_set))
    pad = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    batches = sft_data.StepBatches(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, pad)
    held_out_batches = sft_data.eval_batches(held_out, cfg.batch_size, pad)
    counters = train(model, batches, held_out_batches, _loop_config(cfg, steps), out, label=f"sft {cfg.method}")

    base = {"name": cfg.model or base_dir.parent.name, "source": str(base_dir)}
    counts = stats.summary() | {"train_examples": len(train_set), "eval_examples": len(held_out)}
    lineage = make_lineage(
        str(base_dir),
        kind="sft",
        method=cfg.method,
        settings=dataclasses.asdict(cfg),
        data_sha256=hashes,
        data=counts,
        train=counters | {"max_steps": steps},
        final=_final_metrics(out),
        parent=read_lineage(base_dir),
    )
    write_json(out / "lineage.json", lineage)
    if settings is None:
        save_checkpoint(out / "model", model.cfg, model.state_dict(), tokenizer, lineage)
        chat = f"lmforge chat --model {out / 'model'}"
    else:
        quant = cfg.quant if cfg.method == "qlora" else None
        save_adapter(model, out, cfg.method, settings, base, quant=quant)
        chat = f"lmforge chat --model {base['name']}{f' --quant {quant}' if quant else ''} --adapter {out}"
    return {"out": str(out), "steps": steps, **counts, **_final_metrics(out), "chat": chat}


def _final_metrics(out: Path) -> dict:
    log = read_log(out)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    tok_s = [r["tok_s"] for r in log if "tok_s" in r]
    metrics = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    if evals:
        metrics |= {"eval_loss_before": evals[0], "eval_loss_after": evals[-1]}
    if tok_s:
        metrics["median_tok_s"] = sorted(tok_s)[len(tok_s) // 2]
    return metrics


def report(result: dict) -> None:
    """Print the stage's outcome on stdout, one fact per line."""
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
