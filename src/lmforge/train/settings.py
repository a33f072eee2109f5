"""FinetuneSettings: the settings every fine-tuning stage shares (`sft`, `rm train`, `dpo`), and `lmforge sft`'s own.

Each stage's config dataclass extends it with its own fields (data, losses; align/settings.py holds rm's and
dpo's). The CLI builds those stages' flags from the fields and their `help` metadata (cli_flags), which is why this
module imports neither torch nor the stages. It does not run anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

SFT_METHODS = ("full", "lora", "qlora", "ptuning")
# Every linear of a block, LoRA's default targets.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(kw_only=True)
class FinetuneSettings:
    out: str = field(metadata=doc("output directory (adapter, or model/ for full fine-tuning)"))
    model: str | None = field(default=None, metadata=doc("catalog name, .gguf file or checkpoint directory"))
    method: str = "lora"
    epochs: float = field(default=3.0, metadata=doc("passes over the training data"))
    max_steps: int = field(default=0, metadata=doc("optimizer steps (overrides --epochs; 0 = from epochs)"))
    lr: float | None = field(default=None, metadata=doc("peak learning rate (default: the method's)"))
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = field(default=512, metadata=doc("tokens per sequence"))
    bad_records: str = field(default="stop", metadata=doc("stop (with file:line) or skip bad records"))
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    quant: str = field(default="int4", metadata=doc("the base's quantization for QLoRA"))
    eval_every: int = field(default=50, metadata=doc("steps between held-out evaluations"))
    save_every: int = field(default=100, metadata=doc("steps between resumable checkpoints"))
    keep_last: int = 2
    seed: int = 0
    device: str | None = field(default=None, metadata=doc("cuda or cpu (default: cuda when available)"))
    resume: bool = field(default=False, metadata=doc("continue the run in --out"))
    overwrite: bool = field(default=False, metadata=doc("replace the run in --out"))
    progress: bool = True

    def check_common(self, methods: tuple[str, ...]) -> None:
        choices = {"method": methods, "bad_records": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_len < 2:
            raise LmforgeError("--batch-size and --grad-accum must be at least 1, --max-len at least 2")
        if self.resume and self.overwrite:
            raise LmforgeError("--resume and --overwrite contradict each other; pass one")


@dataclass(kw_only=True)
class SFTConfig(FinetuneSettings):
    data: list[str] = field(metadata=doc("Alpaca / ShareGPT / OpenAI-messages .json or .jsonl files, or "
                                         "builtin:self-cognition, builtin:instructions"))
    mix_data: list[str] = field(default_factory=list, metadata=doc("general text (.txt or JSONL with text) to mix in"))
    mix_ratio: float = field(default=0.0, metadata=doc("fraction of training examples drawn from --mix-data"))
    overlong: str = field(default="truncate", metadata=doc("examples over --max-len: truncate or drop"))
    packing: bool = field(default=False, metadata=doc("pack short examples into full rows"))
    prefix_len: int = field(default=16, metadata=doc("P-Tuning v2 prefix length"))
    name: str = field(default="Forge", metadata=doc("assistant name for {{NAME}} in the data"))
    author: str = field(default="the lmforge team", metadata=doc("author for {{AUTHOR}} in the data"))
    eval_fraction: float = field(default=0.05, metadata=doc("held-out share of the examples"))

    def validate(self) -> None:
        self.check_common(SFT_METHODS)
        if self.overlong not in ("truncate", "drop"):
            raise LmforgeError(f"--overlong {self.overlong!r}: choose truncate or drop")
        if not 0 <= self.mix_ratio < 1:
            raise LmforgeError(f"--mix-ratio {self.mix_ratio}: give a fraction in [0, 1)")
        if self.mix_ratio > 0 and not self.mix_data:
            raise LmforgeError("--mix-ratio needs --mix-data FILE (general text to mix in)")
