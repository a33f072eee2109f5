"""The decode fast path: swap a model's layers for ones that run lmforge's native CPU kernels.

`prepare_for_decode(model)` is how the engine gets speed without the model knowing. The swapped layers compute
the same functions (up to float summation order) from the same weight tensors (no copies): q|k|v and gate|up are
each computed by one kernel call that streams their matrices as if stacked, and a one-token attention step
(RoPE, cache write, grouped-query attention over each row's own length) is one kernel call. Where the kernels do
not apply they fall back to PyTorch's ops: more rows than a GEMV (prefill, which MKL's GEMM handles well), other
dtypes or devices. Without a native library the model is left as it is.
Training never sees these layers; quantized layers (a later stage) are swapped in the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import kernels
from lmforge.model import MLP, Attention, Positions, RMSNorm, Transformer, attend


def _native(x: Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() // x.shape[-1] <= kernels.MAX_ROWS


def _run(eager, op, *args):  # noqa: ANN001, ANN002, ANN202 - a kernel and its custom-op twin
    """Call the kernel directly (a few microseconds) or, under torch.compile, its opaque custom op."""
    return op(*args) if torch.compiler.is_compiling() else eager(*args)


class DecodeLinear(nn.Module):
    """One or more linears that read the same input (q|k|v, gate|up), computed as one stacked product."""

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        self.weights = [lin.weight.detach() for lin in linears]  # the same tensors: no copy; a tied head stays tied
        self.biases = [None if lin.bias is None else lin.bias.detach() for lin in linears]
        self.plan = kernels.LinearPlan(self.weights, self.biases)

    def forward(self, x: Tensor) -> Tensor:
        if not _native(x):
            outs = [F.linear(x, w, b) for w, b in zip(self.weights, self.biases, strict=True)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if torch.compiler.is_compiling():
            return kernels.linear_op(x, self.weights, self.biases)
        return kernels.linear(x, self.plan)


class DecodeRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        if not _native(x):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return _run(kernels.rms_norm, kernels.rms_norm_op, x, self.weight, self.eps)


class DecodeAttention(nn.Module):
    def __init__(self, attn: Attention, rope_cos: Tensor, rope_sin: Tensor) -> None:
        super().__init__()
        self.n_heads, self.n_kv = attn.n_heads, attn.n_kv
        self.rope_cos, self.rope_sin = rope_cos, rope_sin  # the model's (max_pos, D) tables: the kernel indexes them
        self.qkv_proj = DecodeLinear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = DecodeLinear(attn.o_proj)
        self.splits = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, at: Positions | None, cache: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        qkv = self.qkv_proj(x)
        if x.shape[1] == 1 and cache is not None and at is not None and _native(x):
            args = (qkv, self.n_heads, self.n_kv, self.rope_cos, self.rope_sin, at.pos, *cache)
            y = _run(kernels.decode_attention, kernels.decode_attention_op, *args)
        else:
            q, k, v = qkv.split(self.splits, dim=-1)
            y = attend(q, k, v, self.n_heads, self.n_kv, cos, sin, at, cache)
        return self.o_proj(y)


class DecodeMLP(nn.Module):
    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_up_proj = DecodeLinear(mlp.gate_proj, mlp.up_proj)
        self.down_proj = DecodeLinear(mlp.down_proj)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if _native(x):
            h = _run(kernels.silu_mul, kernels.silu_mul_op, gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)


def prepare_for_decode(model: Transformer) -> Transformer:
    """Swap layers in place when the native kernels can serve this model; otherwise leave it as it is."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or kernels.library() is None:
        return model
    swaps = {
        Attention: lambda m: DecodeAttention(m, model.rope_cos, model.rope_sin),
        MLP: DecodeMLP,
        RMSNorm: DecodeRMSNorm,
        nn.Linear: DecodeLinear,
    }
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in swaps:
                setattr(parent, name, swaps[type(child)](child))
    return model
