"""LoRA: low-rank updates added beside a model's linear layers, by swapping each target layer for a wrapper.

`apply_lora(model, cfg)` freezes the model and replaces every target module inside the blocks (`q_proj`,
`down_proj`, ...) with a `LoraLinear` that holds the original module as `base` and adds
`scaling * B(A(dropout(x)))`, B initialised to zero so training starts exactly at the base model. The wrapped
module may be an `nn.Linear` or anything with `in_features`, `out_features` and a `forward(x)` differentiable in
x, such as `lmforge.quant.QuantLinear` (QLoRA: LoRA over a frozen quantized base).
`merge_lora(model)` folds each update into its base weight and puts the plain `nn.Linear` back, so a merged model
is an ordinary Transformer again (saveable as a checkpoint, served by the fast path). There is deliberately no
LoRA model class: the model code stays the same object with some layers swapped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise LmforgeError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(ALL_TARGETS)}")
        if self.rank < 1:
            raise LmforgeError(f"LoRA rank must be at least 1 (got {self.rank})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LoraLinear(nn.Module):
    """y = base(x) + scaling * (dropout(x) @ A^T) @ B^T, with A (rank, in) and B (out, rank) trainable."""

    def __init__(self, base: nn.Module, cfg: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        ref = next(base.parameters(), None)
        if ref is None:  # a quantized base keeps its weights in buffers
            ref = next(base.buffers())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=ref.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=ref.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T  # (..., rank) then (..., out)
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> Tensor:
        """The update as a dense (out, in) matrix."""
        return self.scaling * (self.lora_b @ self.lora_a)


def _targets(model: Transformer, names: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every target layer inside the blocks."""
    found = []
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            found += [(parent, name) for name in names if hasattr(parent, name)]
    return found


def apply_lora(model: Transformer, cfg: LoraConfig) -> Transformer:
    """Freeze the model and wrap its target layers in place; only the LoRA matrices are trainable afterwards."""
    model.requires_grad_(False)
    for parent, name in _targets(model, cfg.targets):
        layer = getattr(parent, name)
        if isinstance(layer, LoraLinear):
            raise LmforgeError("this model already has LoRA layers; merge them (lmforge merge) before adding more")
        setattr(parent, name, LoraLinear(layer, cfg))
    return model


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every LoRA update into its base weight and restore the plain linear layers (W' = W + scaling B A)."""
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, layer in list(parent.named_children()):
                if not isinstance(layer, LoraLinear):
                    continue
                if not isinstance(layer.base, nn.Linear):
                    raise LmforgeError(
                        f"cannot merge LoRA into a {type(layer.base).__name__} (a quantized base); "
                        "merge into the unquantized base model instead (load it without --quant)"
                    )
                layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)
                setattr(parent, name, layer.base)
    return model
