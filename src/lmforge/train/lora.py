"""LoRA: low-rank updates added beside a model's linear layers, by swapping each target layer for a wrapper.

`apply_lora(model, cfg)` freezes the model and replaces every target module inside the blocks (`q_proj`,
`down_proj`, ...) with a `LoraLinear` that holds the original module as `base` and adds
`scaling * B(A(dropout(x)))`, B initialised to zero so training starts exactly at the base model. The wrapped
module may be an `nn.Linear` or anything with `in_features`, `out_features` and a `forward(x)` differentiable in
x, such as `lmforge.quant.QuantLinear` (QLoRA: LoRA over a frozen quantized base).
`merge_lora(model)` folds each update into its base weight and puts the plain `nn.Linear` back, so a merged model
is an ordinary Transformer again (saveable as a checkpoint, served by the fast path). There is deliberately no
LoRA model class: the model code stays the same object with some layers swapped.

Layers that read the same input share its dropout and its down-projection. In a block, q/k/v read one tensor and
gate/up another; their wrappers form a `SharedInput` that draws one dropout mask and computes one stacked product
dropout(x) @ [A_q; A_k; A_v]^T (N, 3 * rank) for all of them, instead of a mask, a masked copy of x and a thin
product per layer. That is the same LoRA update for every layer; what differs from per-layer dropout (PEFT's) is
that q, k and v see the same dropped features (a deliberate choice; its effect on quality is not measured here),
and that dropout keeps half the memory for backward. Dropout itself takes its mask from 16-bit random chunks
(four per 64-bit draw, p rounded to a multiple of 1/65536) and keeps it as bool: on CPU, torch's dropout spends
~10 ms drawing each mask of one (1024, 576) input and saves it as float32 beside the masked copy (7 of each per
block made SmolLM2's LoRA peak above its full fine-tune). The products are laid out so that autograd's thin ones
come out wide (see `_project`), and B's product is added into an `nn.Linear` base's output in place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train.settings import ALL_TARGETS

# Targets that model.Attention and model.MLP call on one and the same tensor.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CHUNKS = 65536  # a 16-bit random chunk decides one element's dropout


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
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def drop_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A bool mask of x's shape, true with probability p (rounded to a multiple of 1/65536), and that probability."""
    drop = round(p * CHUNKS)
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
    chunks = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-32768, 32767]
    return chunks < drop - CHUNKS // 2, drop / CHUNKS


class SharedInput:
    """The LoRA layers of one block that read the same input: one dropout mask, one stacked product with their A.

    The first member called with an input computes dropout(x) @ [A_1; ...; A_k]^T (N, k * rank) and every member
    takes its columns. The product is reused only for the very tensor it was made from, unchanged since (x and
    every A at the same version), so a member called on its own still computes exactly its own update; it is let
    go once each member has read it.
    """

    def __init__(self, members: list[LoraLinear], dropout: float) -> None:
        self.members = members
        self.dropout = dropout
        self._x: Tensor | None = None
        self._key: tuple[int, ...] = ()
        self._h: Tensor | None = None  # (N, k * rank)
        self._scale = 1.0  # the dropout's 1 / (1 - p) rescaling behind _h
        self._unread = 0

    def down(self, x: Tensor, member: LoraLinear) -> tuple[Tensor, float]:
        """member's (N, rank) share of dropout(x) @ A^T, and the dropout's rescaling factor."""
        # Inference tensors carry no version counter; nothing writes into one between sibling calls.
        key = (0 if x.is_inference() else x._version, *(m.lora_a._version for m in self.members))
        if self._x is not x or self._key != key:
            self._h, self._scale = self._project(x, member.training)
            self._x, self._key, self._unread = x, key, len(self.members)
        i, rank = self.members.index(member), member.lora_a.shape[0]
        h, scale = self._h[:, i * rank : (i + 1) * rank], self._scale
        self._unread -= 1
        if self._unread == 0:  # every member has its share: hold no tensor between forward passes
            self._x = self._h = None
        return h, scale

    def _project(self, x: Tensor, training: bool) -> tuple[Tensor, float]:
        a = torch.cat([m.lora_a for m in self.members]) if len(self.members) > 1 else self.members[0].lora_a
        x, a, scale = x.reshape(-1, x.shape[-1]), a.to(x.dtype), 1.0  # x (N, in), a (k * rank, in)
        if training and self.dropout > 0:
            drop, p = drop_mask(x, self.dropout)
            # where() is one pass that saves only the mask (a multiply by a bool mask first copies it to float,
            # forward and backward); the 1 / (1 - p) rescaling goes into the update's alpha, not over all of x.
            x, scale = torch.where(drop, 0.0, x), 1 / (1 - p)
        # Computed as (A x^T)^T: autograd then forms A's and h's gradients as wide products with `rank` rows; the
        # tall, `rank`-column products of the plain x A^T run 3-5x slower in CPU BLAS.
        return (a @ x.T).T, scale


class LoraLinear(nn.Module):
    """y = base(x) + scaling * (dropout(x) @ A^T) @ B^T, with A (rank, in) and B (out, rank) trainable."""

    def __init__(self, base: nn.Module, cfg: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scaling = cfg.scaling
        ref = next(base.parameters(), None)
        if ref is None:  # a quantized base keeps its weights in buffers
            ref = next(base.buffers())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=ref.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=ref.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        # Not a submodule (it refers back to its members); apply_lora regroups siblings that share an input.
        self.shared = SharedInput([self], cfg.dropout)
        self.enabled = True  # off: exactly the base layer (adapters_off, DPO's reference model)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        h, rescale = self.shared.down(x, self)  # (N, rank)
        y = self.base(x.reshape(-1, x.shape[-1]))  # (N, out): flat, so that y is no view of another tensor
        # B^T made contiguous (rank, out), for the same reason as h's layout in SharedInput._project.
        b, alpha = self.lora_b.T.to(y.dtype).contiguous(), self.scaling * rescale
        if isinstance(self.base, nn.Linear):
            # Into nn.Linear's output in place: no (N, out) temporary, and its backward never reads its output.
            # Another base (QuantLinear's custom autograd function) may not have its output written.
            y = y.addmm_(h.to(y.dtype), b, alpha=alpha)
        else:
            y = torch.addmm(y, h.to(y.dtype), b, alpha=alpha)
        return y.view(*x.shape[:-1], y.shape[-1])

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
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for names in SHARED_INPUTS:
                members = [getattr(parent, n) for n in names if isinstance(getattr(parent, n, None), LoraLinear)]
                shared = SharedInput(members, cfg.dropout)
                for member in members:
                    member.shared = shared
    return model


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the model as its base inside the block: every LoRA layer returns its base layer's output untouched.
    This is DPO's reference model under LoRA, with no second copy of the weights in memory."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


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
