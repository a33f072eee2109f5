"""Quantized linear layers and the swap that puts them into a model: `quantize_(model, scheme)`.

`QuantLinear` holds packed weights (pack.py) as buffers, so a quantized model saves and loads through the normal
checkpoint code, and it has no trainable parameters (QLoRA wraps it). Its forward picks a path by shape:
- a few rows on CPU in float32 (a decode step, also of a batch): the native INT8/INT4 kernel on the packed bytes;
- many rows (prefill, scoring, training) or another device/dtype: expand the weight to float and run one GEMM.
  The expansion happens per call and is never kept, and backward re-expands instead of saving it.
Under torch.compile the kernel is the opaque custom op `lmforge::linear_q`. This module does not choose the
rounding (pack.py, gptq.py) or stack q|k|v for the fast path (fastpath.py does, with `kernels.QuantPlan`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import kernels
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant import pack
from lmforge.quant.scheme import QuantScheme

# Up to this many rows the kernel runs (in turns of kernels.MAX_ROWS): it streams the packed weights once per turn,
# which beats expanding them to float until the turns add up to the expansion's own memory traffic.
KERNEL_ROWS = 32
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class _ExpandedLinear(torch.autograd.Function):
    """y = x @ W^T + b with W expanded from its packed form; backward expands it again rather than keep it."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:  # noqa: ANN001
        ctx.layer = layer
        return F.linear(x, layer.expanded(x.dtype, x.device), layer.bias_as(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad @ ctx.layer.expanded(grad.dtype, grad.device), None


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        packed_width = in_features if bits == 8 else in_features // 2
        groups = in_features // group_size
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, packed_width, dtype=qdtype))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16) if bits == 4 else None)
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._plan: kernels.QuantPlan | None = None  # raw pointers into the buffers, made on the first kernel call
        self._native = kernels.library() is not None  # decided once: torch.compile must not trace the build check

    @classmethod
    def from_packed(cls, p: pack.Packed, bias: Tensor | None, bits: int, group_size: int) -> QuantLinear:
        n = p.scales.shape[0]
        layer = cls(p.scales.shape[1] * group_size, n, bias is not None, bits, group_size)
        layer.qweight, layer.scales, layer.mins = p.qweight.contiguous(), p.scales.contiguous(), p.mins
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    @property
    def packed(self) -> pack.Packed:
        return pack.Packed(self.qweight, self.scales, self.mins)

    def expanded(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The float weight (out, in) this layer stands for, made now."""
        if self.qweight.is_cpu and kernels.library() is not None:
            w = kernels.dequantize(self.qweight, self.scales, self.mins, self.bits, self.group_size)
        else:
            w = pack.dequantize(self.packed, self.bits, self.group_size, torch.float32)
        return w.to(device=device, dtype=dtype)

    def bias_as(self, x: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def plan(self) -> kernels.QuantPlan:
        if self._plan is None:
            self._plan = kernels.QuantPlan(
                [self.qweight], [self.scales], [self.mins], [self.bias], self.bits, self.group_size
            )
        return self._plan

    def forward(self, x: Tensor) -> Tensor:
        if self._native and kernel_applies(x):
            if torch.compiler.is_compiling():
                return kernels.linear_q_op(
                    x, [self.qweight], [self.scales], [self.mins], [self.bias], self.bits, self.group_size
                )
            return kernels.linear(x, self.plan())
        return _ExpandedLinear.apply(x, self)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's own signature
        self._plan = None  # .to() and friends may move the buffers the plan points into
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding table stored like a quantized linear's weight (vocab, hidden): a lookup expands only the rows
    it reads. A tied model's table IS its quantized head, held by reference so the checkpoint stores it once."""

    def __init__(self, table: QuantLinear, tied: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.tied = tied
        if tied:
            self._table = [table]  # a plain list: not registered, so state_dict holds the head's tensors only
        else:
            self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        t = self._table[0] if self.tied else self.table
        flat = ids.flatten()
        rows = pack.Packed(t.qweight[flat], t.scales[flat], None if t.mins is None else t.mins[flat])
        w = pack.dequantize(rows, t.bits, t.group_size)  # (B*T, hidden)
        return w.reshape(*ids.shape, -1)


def kernel_applies(x: Tensor) -> bool:
    """A decode-shaped product the native kernel serves: a few float32 rows on CPU, no gradient wanted."""
    return (
        x.is_cpu
        and x.dtype is torch.float32
        and x.numel() <= KERNEL_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def scheme_of(model: nn.Module) -> QuantScheme | None:
    """The scheme a model was quantized with, or None for a float model."""
    return getattr(model, "quant_scheme", None)


def _targets(model: Transformer, scheme: QuantScheme) -> Iterator[tuple[str, int]]:
    """(module name, bits) of every linear the scheme quantizes."""
    for i in range(len(model.layers)):
        for name in BLOCK_LINEARS:
            yield f"layers.{i}.{name}", scheme.bits_for(f"layers.{i}.{name}")
    if scheme.head_bits is not None:
        yield "lm_head", scheme.head_bits


def _swap_embedding(model: Transformer, scheme: QuantScheme, empty: bool) -> None:
    """Tied: look rows up in the quantized head. Untied: the table quantized at embed_bits (or empty, for loading)."""
    if model.cfg.tie_embeddings and isinstance(model.lm_head, QuantLinear):
        model.embed_tokens = QuantEmbedding(model.lm_head, tied=True)
    elif not model.cfg.tie_embeddings and scheme.embed_bits is not None:
        vocab, hidden = model.cfg.vocab_size, model.cfg.hidden_size
        pack.check_shape("embed_tokens", vocab, hidden, scheme.group_size)
        if empty:
            table = QuantLinear(hidden, vocab, False, scheme.embed_bits, scheme.group_size)
        else:
            p = pack.quantize_rtn(model.embed_tokens.weight.detach(), scheme.embed_bits, scheme.group_size)
            table = QuantLinear.from_packed(p, None, scheme.embed_bits, scheme.group_size)
        model.embed_tokens = QuantEmbedding(table, tied=False)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_(
    model: Transformer, scheme: QuantScheme, packed: dict[str, pack.Packed] | None = None, progress: bool = True
) -> Transformer:
    """Swap the scheme's linears for QuantLinears in place: rounded to nearest, or from `packed` (GPTQ's output)."""
    from lmforge.progress import track

    if scheme_of(model) is not None:
        raise LmforgeError(
            f"the model is already quantized ({scheme_of(model).label}); quantize the float checkpoint instead"
        )
    targets = list(_targets(model, scheme))
    for name, _ in targets:
        lin = model.get_submodule(name)
        pack.check_shape(name, lin.out_features, lin.in_features, scheme.group_size)
    for name, bits in track(targets, f"quantizing to int{scheme.bits}", enabled=progress):
        lin = model.get_submodule(name)
        p = (packed or {}).get(name) or pack.quantize_rtn(lin.weight.detach(), bits, scheme.group_size)
        _replace(model, name, QuantLinear.from_packed(p, lin.bias, bits, scheme.group_size))
    _swap_embedding(model, scheme, empty=False)
    model.quant_scheme = scheme
    return model


def make_quantized(model: Transformer, scheme: QuantScheme) -> Transformer:
    """Swap in empty QuantLinears of the right shapes, for a quantized checkpoint's tensors to be assigned into."""
    for name, bits in _targets(model, scheme):
        lin = model.get_submodule(name)
        pack.check_shape(name, lin.out_features, lin.in_features, scheme.group_size)
        _replace(
            model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, bits, scheme.group_size)
        )
    _swap_embedding(model, scheme, empty=True)
    model.quant_scheme = scheme
    return model
