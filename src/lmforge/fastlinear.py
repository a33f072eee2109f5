"""A weight layout that lets decoding on CPU read weights at memory bandwidth.

Decoding multiplies one activation row by every weight matrix, so its speed is bytes read per second. On the
CPUs we measured (AVX2, MKL), `F.linear` with one row runs a single-threaded GEMV at ~12-16 GB/s, while a batched
matmul over column blocks runs one block per thread and reaches ~21-23 GB/s, close to what a plain reduction
reads. `BlockedLinear` stores the same weight as (blocks, in, out/blocks) and computes the same product with
`torch.bmm`; `prepare_for_decode` swaps it in for the model's linear layers (the head included) on CPU.
It changes layout only: values and results are the same function as `nn.Linear` (up to summation order).
Training never sees these layers; quantized layers (a later stage) replace them the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.model import Transformer


class BlockedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: int) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.in_features, self.out_features, self.blocks = in_f, out_f, blocks
        w = linear.weight.detach()
        # (N, K) -> (blocks, K, N/blocks): block j holds output columns [j*N/blocks, (j+1)*N/blocks)
        self.weight = nn.Parameter(w.reshape(blocks, out_f // blocks, in_f).transpose(1, 2).contiguous(), False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(1, -1, self.in_features).expand(self.blocks, -1, -1)  # (blocks, M, K)
        y = torch.bmm(rows, self.weight)  # (blocks, M, N/blocks)
        # With one row the blocks already lie in output order; with more they must be interleaved back.
        y = y.reshape(*lead, self.out_features) if y.shape[1] == 1 else y.transpose(0, 1).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


def prepare_for_decode(model: Transformer, blocks: int | None = None) -> Transformer:
    """Swap the linear layers of a CPU model for `BlockedLinear` in place; other devices are left as they are."""
    if next(model.parameters()).device.type != "cpu":
        return model
    blocks = blocks or max(torch.get_num_threads(), 1)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.out_features % blocks == 0:
                setattr(parent, name, BlockedLinear(child, blocks))
    return model
