"""The decode fast path: swap a model's layers for ones that run lmforge's native CPU kernels.

`prepare_for_decode(model)` is how the engine gets speed without the model knowing. The swapped layers compute
the same functions (up to float summation order) from the same weight tensors (no copies): q|k|v and gate|up are
each computed by one kernel call that streams their matrices as if stacked, and a one-token attention step
(RoPE, cache write, grouped-query attention over each row's own length) is one kernel call. Where the kernels do
not apply they fall back to PyTorch's ops: more rows than a GEMV (prefill, which MKL's GEMM handles well), other
dtypes or devices. Without a native library the model is left as it is.
Quantized linears (lmforge.quant) stack the same way and run the INT8/INT4 kernels. Training never sees these layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import kernels
from lmforge.model import MLP, Attention, Block, Positions, RMSNorm, Transformer, attend


def _native(x: Tensor) -> bool:
    return x.is_cpu and x.dtype is torch.float32 and x.numel() <= kernels.MAX_ROWS * x.shape[-1]


def _run(eager, op, *args):  # noqa: ANN001, ANN002, ANN202 - a kernel and its custom-op twin
    """Call the kernel directly (a few microseconds) or, under torch.compile, its opaque custom op."""
    return op(*args) if torch.compiler.is_compiling() else eager(*args)


class DecodeLinear(nn.Module):
    """One or more linears that read the same input (q|k|v, gate|up), computed as one stacked product.

    Float and quantized (lmforge.quant.QuantLinear) linears both stack, when all of one kind and scheme. Anything
    else (a LoRA-wrapped layer, mixed kinds) has no plan and runs each module's own forward.
    """

    def __init__(self, *linears: nn.Module) -> None:
        super().__init__()
        self.linears = list(linears)  # a plain list: the model already owns these modules (a tied head stays tied)
        self.plan = _plan(self.linears)

    def forward(self, x: Tensor) -> Tensor:
        if self.plan is None or not _native(x):
            outs = [lin(x) for lin in self.linears]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if torch.compiler.is_compiling():
            return _compiled_linear(x, self.linears)
        return kernels.linear(x, self.plan)


def _plan(linears: list[nn.Module]) -> kernels.LinearPlan | kernels.QuantPlan | None:
    from lmforge.quant import QuantLinear

    if all(type(lin) is nn.Linear for lin in linears):
        weights = [lin.weight.detach() for lin in linears]
        return kernels.LinearPlan(weights, [None if lin.bias is None else lin.bias.detach() for lin in linears])
    if all(isinstance(lin, QuantLinear) for lin in linears):
        schemes = {(lin.bits, lin.group_size) for lin in linears}
        if len(schemes) == 1:
            bits, group = schemes.pop()
            tensors = [[getattr(lin, n) for lin in linears] for n in ("qweight", "scales", "mins", "bias")]
            return kernels.QuantPlan(*tensors, bits, group)
    return None


def _compiled_linear(x: Tensor, linears: list[nn.Module]) -> Tensor:
    """The stacked product as one opaque custom op, for torch.compile."""
    biases = [lin.bias for lin in linears]
    if type(linears[0]) is nn.Linear:
        return kernels.linear_op(x, [lin.weight for lin in linears], biases)
    qweights, scales, mins = ([getattr(lin, n) for lin in linears] for n in ("qweight", "scales", "mins"))
    return kernels.linear_q_op(x, qweights, scales, mins, biases, linears[0].bits, linears[0].group_size)


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
        if x.shape[1] == 1 and cache is not None and at is not None and at.rope is None and _native(x):
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


class DecodeBlock(nn.Module):
    """A Transformer block whose one-token steps are one native call (kernels.decode_layer, layer.c).

    A decode step of a small model is dozens of short products per layer, so Python overhead and thread
    start-ups rival the weight reads; here a layer is one call into buffers it keeps, with no module calls and no
    new tensors. Other calls (prefill, torch.compile) take the general path through the swapped sub-layers.
    """

    def __init__(self, block: Block, rope_cos: Tensor, rope_sin: Tensor) -> None:
        super().__init__()
        self.input_layernorm = DecodeRMSNorm(block.input_layernorm)
        self.self_attn = DecodeAttention(block.self_attn, rope_cos, rope_sin)
        self.post_attention_layernorm = DecodeRMSNorm(block.post_attention_layernorm)
        self.mlp = DecodeMLP(block.mlp)
        linears = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        self._planned = all(lin.plan is not None for lin in linears)
        self._layers: dict[int, kernels.LayerPlan] = {}  # batch size -> the native layer with its buffers

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, at: Positions | None, cache: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        if (
            x.shape[1] != 1
            or cache is None
            or at is None
            or not _native(x)
            or torch.compiler.is_compiling()
            or not self._planned
        ):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, at, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        return kernels.decode_layer(self._layer_for(x.shape[0]), x, at.pos, *cache)

    def _layer_for(self, batch: int) -> kernels.LayerPlan:
        if batch not in self._layers:
            attn, mlp = self.self_attn, self.mlp
            self._layers[batch] = kernels.LayerPlan(
                (self.input_layernorm.weight, self.post_attention_layernorm.weight),
                self.input_layernorm.eps,
                (attn.n_heads, attn.n_kv, attn.rope_cos.shape[-1]),
                (attn.qkv_proj.plan, attn.o_proj.plan, mlp.gate_up_proj.plan, mlp.down_proj.plan),
                (attn.rope_cos, attn.rope_sin),
                batch,
            )
        return self._layers[batch]


def prepare_for_decode(model: Transformer) -> Transformer:
    """Swap layers in place when the native kernels can serve this model; otherwise leave it as it is."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or kernels.library() is None:
        return model
    if any(isinstance(block, DecodeBlock) for block in model.layers):
        return model  # prepared already (a second engine over the same model)
    for i, block in enumerate(model.layers):
        model.layers[i] = DecodeBlock(block, model.rope_cos, model.rope_sin)
    model.norm = DecodeRMSNorm(model.norm)
    model.lm_head = DecodeLinear(model.lm_head)
    return model
