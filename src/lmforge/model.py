"""The decoder-only Transformer every lmforge stage trains, tunes, quantizes and serves.

Design choices, all driven by `ModelConfig` fields:
- pre-norm blocks with RMSNorm; rotary position embeddings (rotate-half convention, as in HF Llama/Qwen2),
  with linear and llama3 frequency scaling;
- grouped-query attention through `F.scaled_dot_product_attention`;
- SwiGLU MLP; optional bias on q/k/v (Qwen2); tied or untied output head.
Parameter names follow Hugging Face's Llama layout without the `model.` prefix, so checkpoint conversion is a
rename, not a reshuffle. The KV cache is owned by the caller (the engine) and passed in; the model keeps no
generation state. This module does not sample, batch or load files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (head_dim/2,), with the config's scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind is not None:
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv.float()


def rope_table(cfg: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin tables (length, head_dim), duplicated halves for the rotate-half convention."""
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(cfg))  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x * cos + [-x2, x1] * sin, written as x * cos + [x2, x1] * [-sin1, sin2].

    Bit for bit the same numbers (a sign flip is exact), but the swap is one `roll` whose backward is one `roll`,
    where slicing and concatenating x made autograd zero-fill and copy two full-size gradients; the sign moves onto
    the small (T, D) table.
    """
    # x: (B, H, T, D); cos/sin: (B, 1, T, D) or (T, D)
    half = x.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return x * cos + x.roll(half, dims=-1) * signed_sin


@dataclass
class KVCache:
    """Preallocated key/value buffers, one pair per layer: (B, kv_heads, max_len, head_dim).

    Row b's entries at positions >= its current length are stale and are never attended to, because a query
    at position p only sees keys at positions <= p. That is what lets rows of different lengths share one buffer.
    """

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


@dataclass
class Positions:
    """Where the tokens of one forward call sit, and what they may attend to.

    pos: (T,) when every row shares the same positions, else (B, T): cache slots, and RoPE positions unless `rope`.
    kv_len: how many cache positions to attend over (the largest row length after this call).
    mask: (B, 1, T, kv_len) boolean, or None when plain causal attention is exact (see `Positions.make`).
    rope: (T,) RoPE positions where they differ from the slots: `Positions.packed`, several sequences in one row.
    """

    pos: Tensor
    kv_len: int
    mask: Tensor | None
    causal: bool
    rope: Tensor | None = None

    @classmethod
    def make(cls, pos: Tensor) -> Positions:
        kv_len = int(pos.max()) + 1
        t = pos.shape[-1]
        first = pos[..., 0]
        if pos.dim() == 1 and (t == 1 or int(first) == 0):
            # One decode token sees every cached key; a fresh prompt is plainly causal.
            return cls(pos, kv_len, None, causal=t > 1)
        rows = pos if pos.dim() == 2 else pos[None]  # (B or 1, T)
        mask = torch.arange(kv_len, device=pos.device) <= rows[:, :, None]  # (B, T, kv_len)
        return cls(pos, kv_len, mask[:, None], causal=False)

    @classmethod
    def packed(cls, rope: Tensor, mask: Tensor) -> Positions:
        """T tokens of one row in slots 0..T-1, at RoPE positions `rope` (T,), token i seeing j where mask[i, j]."""
        t = rope.shape[0]
        return cls(torch.arange(t, device=rope.device), t, mask[None, None], causal=False, rope=rope)

    def shifted(self, p: int) -> Positions:
        """These positions behind p leading cache slots that every token sees (a P-Tuning prefix)."""
        if self.rope is None:
            return Positions.make(self.pos + p)
        assert self.mask is not None
        seen = torch.ones(*self.mask.shape[:-1], p, dtype=torch.bool, device=self.mask.device)
        return Positions(self.pos + p, self.kv_len + p, torch.cat([seen, self.mask], -1), False, self.rope + p)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, h, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, at: Positions | None, cache: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(attend(q, k, v, self.n_heads, self.n_kv, cos, sin, at, cache))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_heads: int,
    n_kv: int,
    cos: Tensor,
    sin: Tensor,
    at: Positions | None,
    cache: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Attention from projected q (B, T, H*D), k and v (B, T, Hkv*D): RoPE, cache write, SDPA; returns (B, T, H*D)."""
    b, t, _ = q.shape
    q = q.view(b, t, n_heads, -1).transpose(1, 2)  # (B, H, T, D)
    k = k.view(b, t, n_kv, -1).transpose(1, 2)  # (B, Hkv, T, D)
    v = v.view(b, t, n_kv, -1).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask, causal = None, True
    if cache is not None:
        assert at is not None
        k, v = write_cache(cache, k, v, at)
    if at is not None:
        mask, causal = at.mask, at.causal
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=n_kv != n_heads)
    return y.transpose(1, 2).reshape(b, t, -1)


def write_cache(cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor, at: Positions) -> tuple[Tensor, Tensor]:
    """Store this call's keys/values at their positions; return the cache prefix to attend over."""
    k_cache, v_cache = cache
    if at.pos.dim() == 1:
        k_cache.index_copy_(2, at.pos, k)
        v_cache.index_copy_(2, at.pos, v)
    else:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        k_cache[rows, :, at.pos] = k.transpose(1, 2)  # advanced indices first: (B, T, Hkv, D)
        v_cache[rows, :, at.pos] = v.transpose(1, 2)
    return k_cache[:, :, : at.kv_len], v_cache[:, :, : at.kv_len]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, at: Positions | None, cache: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, at, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.num_labels:  # a reward model: a scalar per position instead of the vocabulary's logits
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_table(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # P-Tuning v2 (lmforge.train.ptuning): learned keys/values occupying the first cache slots, or None.
        self.prefix: nn.Module | None = None

    @property
    def prefix_len(self) -> int:
        """Cache slots before the first token (the P-Tuning prefix); callers sizing a cache add these."""
        return 0 if self.prefix is None else self.prefix.length

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch (normal init, output projections scaled by depth)."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: Tensor,
        positions: Positions | None = None,
        cache: KVCache | None = None,
        keep: int | Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab), or (B, T, num_labels) scores for a reward model. Without a cache this is the plain
        causal training pass.

        keep: compute logits only where they are read: an int index shared by all rows (-1 = last) or a (B,)
        tensor of per-row indices gives (B, 1, vocab); a (B, K) tensor of per-row indices gives (B, K, vocab)
        (scoring reads many positions); a (B, T) bool mask gives (N, vocab) for its N true positions (training
        reads only positions with targets). Skips the head's work on tokens nobody reads.
        """
        b, t = input_ids.shape
        if self.prefix is not None:
            positions, cache = self.prefix(input_ids, positions, cache)  # tokens move to positions P, P+1, ...
        if positions is None:
            pos = torch.arange(t, device=input_ids.device)
        else:
            pos = positions.pos if positions.rope is None else positions.rope
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D) or (B, T, D)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D) to broadcast over heads
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x = layer(x, cos, sin, positions, layer_cache)
        if isinstance(keep, int):
            x = x[:, keep:][:, :1]
        elif keep is not None and keep.dtype == torch.bool:
            # Pretraining reads every position: a view then, not a gather whose backward zero-fills a copy.
            x = x.reshape(-1, x.shape[-1]) if bool(keep.all()) else x[keep]  # (N, H)
        elif keep is not None:
            rows = keep if keep.dim() == 2 else keep[:, None]  # (B, K)
            x = x[torch.arange(b, device=x.device)[:, None], rows]
        return (self.score if self.cfg.num_labels else self.lm_head)(self.norm(x))
