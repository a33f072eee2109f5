"""The settings of `lmforge rm train` and `lmforge dpo`, and the names their flags accept.

Kept apart from the stages so the CLI can build their flags from the fields without importing torch.
It does not run anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.train.settings import FinetuneSettings, doc

LOSSES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "simpo")
LENGTH_AVERAGED = ("ipo", "simpo")  # these compare mean per-token log-probabilities, not sums
REFERENCE_FREE = ("simpo",)
DPO_METHODS = ("full", "lora", "qlora")
DPO_LR = {"full": 1e-6, "lora": 5e-5, "qlora": 5e-5}
RM_METHODS = ("full", "lora")
RM_LR = {"full": 1e-5, "lora": 2e-4}


@dataclass(kw_only=True)
class PreferenceSettings(FinetuneSettings):
    """What preference training adds to any fine-tuning: pair files and the held-out pairs."""

    data: list[str] = field(metadata=doc("preference .json/.jsonl files (prompt/chosen/rejected, messages or HH)"))
    eval_data: list[str] = field(default_factory=list, metadata=doc("held-out pairs (default: a split of --data)"))
    eval_fraction: float = field(default=0.1, metadata=doc("held-out share of --data when no --eval-data"))

    def check_preferences(self, methods: tuple[str, ...]) -> None:
        self.check_common(methods)
        if not 0 <= self.eval_fraction < 1:
            raise LmforgeError(f"--eval-fraction {self.eval_fraction}: give a fraction in [0, 1)")


@dataclass(kw_only=True)
class RMConfig(PreferenceSettings):
    margin: str | None = field(default=None, metadata=doc("data column holding each pair's margin"))
    center_rewards: float = field(default=0.0, metadata=doc("weight of (r_chosen + r_rejected)^2"))
    epochs: float = 2.0

    def validate(self) -> None:
        self.check_preferences(RM_METHODS)


@dataclass(kw_only=True)
class DPOConfig(PreferenceSettings):
    loss: str = field(default="sigmoid", metadata=doc(f"one of {', '.join(LOSSES)}"))
    beta: float | None = field(default=None, metadata=doc("how tightly the policy stays near the reference (0.1; "
                                                          "simpo 2.0)"))
    label_smoothing: float = field(default=0.0, metadata=doc("assumed share of flipped labels (sigmoid, robust)"))
    gamma: float = field(default=0.5, metadata=doc("SimPO's target reward margin"))
    sft_weight: float = field(default=0.0, metadata=doc("weight of the NLL of chosen replies (RPO)"))
    precompute_ref: bool | None = field(
        default=None, metadata=doc("compute reference log-probs once and cache them (default: on for full)")
    )
    epochs: float = 1.0
    lora_dropout: float = 0.0  # dropout would make the policy differ from its reference at step 0

    def validate(self) -> None:
        self.check_preferences(DPO_METHODS)
        if self.loss not in LOSSES:
            raise LmforgeError(f"--loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        if self.beta is not None and self.beta <= 0:
            raise LmforgeError(f"--beta {self.beta}: give a positive number")
        if not 0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"--label-smoothing {self.label_smoothing}: give a value in [0, 0.5)")

    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)

    def precompute(self) -> bool:
        return self.precompute_ref if self.precompute_ref is not None else self.method == "full"
