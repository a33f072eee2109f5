"""Turning logits into the next token: greedy, temperature, top-k, top-p and repetition penalty.

Each row of a batch may carry its own settings (the server batches requests that asked for different ones), so
every function here works on (B, vocab) logits with per-row parameters. Nothing here touches the model or cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"sampling: {message}")


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (as in transformers): divide positive scores of seen tokens, multiply negative ones.

    logits: (B, V); history: (B, N) token ids already in each row (prompt and output).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def candidates(logits: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """The tokens top-k and top-p allow: (logits, ids), each (B, n) sorted by logit, excluded ones at -inf.

    Sorting a 150k vocabulary costs tens of milliseconds per token, so top-p looks at the best 64 tokens first and
    widens only while their probability mass is still below top_p: the nucleus is always inside that prefix.
    Without either filter every token is a candidate, in vocabulary order.
    """
    vocab = logits.shape[-1]
    if top_k <= 0 and top_p >= 1.0:
        return logits, torch.arange(vocab, device=logits.device).expand_as(logits)
    k = min(top_k if top_k > 0 else 64, vocab)
    probs = logits.softmax(-1)
    while True:
        top_probs, ids = torch.topk(probs, k, dim=-1)
        if top_k > 0 or k == vocab or bool((top_probs.sum(-1) >= top_p).all()):
            break
        k = min(k * 4, vocab)
    chosen = logits.gather(-1, ids)
    if top_p < 1.0:
        # Drop a token when the mass before it already reaches top_p (so the top token always stays).
        mass = top_probs / top_probs.sum(-1, keepdim=True) if top_k > 0 else top_probs
        chosen = chosen.masked_fill(mass.cumsum(-1) - mass >= top_p, float("-inf"))
    return chosen, ids


def sample(logits: Tensor, params: SamplingParams, history: Tensor, generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    chosen, ids = candidates(logits / params.temperature, params.top_k, params.top_p)
    # Inverse-CDF draw: one uniform number per row (torch.multinomial is slow on a 150k vocabulary).
    cdf = chosen.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1)
    return ids.gather(-1, pick).squeeze(-1)


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The random stream of one request's `sample` calls: seeded when the request gave a seed, else torch's global."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
