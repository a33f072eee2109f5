"""PretrainConfig: every setting of `lmforge pretrain`, and reading them from a JSON or YAML file.

Kept apart from pretrain.py so that the CLI can build its flags from the fields without importing torch.
It does not run anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import PRESETS
from lmforge.errors import LmforgeError

STRATEGIES = ("none", "ddp", "fsdp")
# Settings that may change between a run and its resume without making it a different run.
NOT_IDENTITY = ("resume", "overwrite", "progress", "device", "save_every", "keep_last", "eval_every", "config")


@dataclass
class PretrainConfig:
    shards: str
    out: str
    tokenizer: str | None = None  # directory with tokenizer.json; default: the --init checkpoint's
    preset: str = "llama-tiny"
    init: str | None = None  # continue from this checkpoint instead of a fresh preset
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per rank
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # or "wsd"
    decay_ratio: float = 0.2
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    init_std: float = 0.02
    val_windows: int = 32
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    distributed: str = "none"  # none | ddp | fsdp (under torchrun)
    compile: bool = False
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward, to save memory
    spike_factor: float = 2.0
    max_rollbacks: int = 5
    skip_batches: int = 1
    cooldown_steps: int = 0
    healing: bool = True
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    config: str | None = None  # the file the settings came from, if any

    def validate(self) -> None:
        if self.schedule not in ("cosine", "wsd"):
            raise LmforgeError(f"--schedule {self.schedule!r}: choose cosine or wsd")
        if self.distributed not in STRATEGIES:
            raise LmforgeError(f"--distributed {self.distributed!r}: choose {', '.join(STRATEGIES)}")
        if self.init is None and self.preset not in PRESETS:
            raise LmforgeError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if min(self.batch_size, self.grad_accum, self.max_steps, self.seq_len) < 1:
            raise LmforgeError("--batch-size, --grad-accum, --max-steps and --seq-len must be at least 1")
        if self.resume and self.overwrite:
            raise LmforgeError("--resume and --overwrite contradict each other; pass one")


def load_config_file(path: str) -> dict:
    """Settings from a JSON or YAML file, keys as the dataclass fields (dashes allowed)."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise LmforgeError(f"{p}: YAML configs need pyyaml (pip install pyyaml), or write JSON") from e
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    data = {k.replace("-", "_"): v for k, v in (data or {}).items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise LmforgeError(f"{p}: unknown settings {', '.join(unknown)}")
    return data
