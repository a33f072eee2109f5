"""P-Tuning v2 (deep prompt tuning): P learned key/value vectors in front of every layer's attention.

The learned prefix is simply the first P slots of the KV cache. `apply_ptuning(model, cfg)` freezes the model and
sets `model.prefix` to a `Prefix`; `Transformer.forward` hands each call to it, and it
- places the prefix keys/values in cache slots 0..P-1 (for training, where there is no cache, it builds a
  throwaway cache of P + T slots whose first P slots are the prefix, so gradients reach it through the cache);
- moves the tokens to positions P, P+1, ... so they land after the prefix.
Prefix keys carry no RoPE rotation of their own (they are learned as they are used), and tokens sit at the same
offset positions in training and in inference, so the engine's cached decoding, including its native fast path
and prefix reuse, computes exactly what training computed. The engine reserves the P slots through
`Transformer.prefix_len`.
There is no reparameterisation MLP (ChatGLM's P-Tuning v2 default also trains the prefix directly), and nothing
here can be merged into the base weights: a P-Tuning adapter is always loaded beside its base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model import KVCache, Positions, Transformer


@dataclass
class PtuningConfig:
    prefix_len: int = 16
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.prefix_len < 1:
            raise LmforgeError(f"the P-Tuning prefix length must be at least 1 (got {self.prefix_len})")

    def to_dict(self) -> dict:
        return asdict(self)


class Prefix(nn.Module):
    """Learned keys and values, (layers, kv_heads, P, head_dim) each, shared by every row of a batch."""

    def __init__(self, model: Transformer, cfg: PtuningConfig) -> None:
        super().__init__()
        mc = model.cfg
        ref = model.embed_tokens.weight
        shape = (mc.num_layers, mc.num_kv_heads, cfg.prefix_len, mc.head_dim)
        self.k = nn.Parameter(torch.randn(shape, device=ref.device, dtype=ref.dtype) * cfg.init_std)
        self.v = nn.Parameter(torch.randn(shape, device=ref.device, dtype=ref.dtype) * cfg.init_std)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def forward(
        self, input_ids: Tensor, positions: Positions | None, cache: KVCache | None
    ) -> tuple[Positions, KVCache]:
        """The positions and cache the layers should use instead of the caller's."""
        b, t = input_ids.shape
        p = self.length
        if cache is None:  # training / plain forward: a cache of P + T slots, tokens at P..P+T-1
            tail = torch.zeros(b, self.k.shape[1], t, self.k.shape[3], dtype=self.k.dtype, device=self.k.device)
            cache = KVCache(
                k=[torch.cat([k.expand(b, -1, -1, -1), tail], dim=2) for k in self.k],
                v=[torch.cat([v.expand(b, -1, -1, -1), tail], dim=2) for v in self.v],
            )
        else:  # the engine's cache: its first P slots belong to the prefix
            for i in range(len(cache.k)):
                cache.k[i][:, :, :p] = self.k[i]
                cache.v[i][:, :, :p] = self.v[i]
        at = positions if positions is not None else Positions.make(torch.arange(t, device=input_ids.device))
        return at.shifted(p), cache


def apply_ptuning(model: Transformer, cfg: PtuningConfig) -> Transformer:
    """Freeze the model and give it a trainable prefix; only `model.prefix` is trainable afterwards."""
    if model.prefix is not None:
        raise LmforgeError("this model already has a P-Tuning prefix; load the base model without --adapter")
    model.requires_grad_(False)
    model.prefix = Prefix(model, cfg)
    return model
