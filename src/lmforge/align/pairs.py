"""One prompt and several replies to it in one row: the prompt's tokens are computed once and shared by its replies.

A row holds prompt + reply_1 + reply_2 + ... (a preference pair is two replies; best-of-n scores n). Every reply
sits at the RoPE positions it would have right after the prompt, and a mask lets a reply token see the prompt and
the earlier tokens of its own reply only, so each reply's numbers equal those of prompt+reply run alone, while
the prompt is run once instead of once per reply. Rows are right-padded; padding sees only the prompt and other
padding, and no real token sees padding.

From such a batch:
- `reply_logps`: each reply's summed log-probability under a language model (DPO and its family), and the
  per-token negative log-likelihood for an SFT term; the vocabulary head runs only where a reply token is predicted;
- `reply_scores`: a reward model's scalar at each reply's last token (where HF's sequence classifier reads it).
This module does not define losses or read files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.align.prefs import Pair
from lmforge.model import Positions
from lmforge.train.loop import Batch, autocast_for, token_nll


@dataclass
class Group:
    prompt: list[int]
    replies: list[list[int]]


def collate_groups(groups: list[Group], pad_id: int) -> Batch:
    """Tensors of a batch of groups (B rows; n replies per group, the same n in every group).

    input_ids, rope, segment (B, T): ids, RoPE positions, 0 for prompt, k for reply k, -1 for padding.
    read, read_target, read_reply (B, K): the slots whose logits predict a reply token, that token, and its reply
    (-1 for padding reads); the first token of every reply is predicted from the prompt's last slot.
    last (B, n): each reply's last slot. reply_len (B, n). tokens (1,): prompt+reply tokens over all replies.
    """
    n = len(groups[0].replies)
    if any(len(g.replies) != n or not g.prompt or not all(g.replies) for g in groups):
        raise ValueError("every group needs a prompt and the same number of non-empty replies")
    rows, reads = [], []
    for g in groups:
        ids, rope, seg, read, last = list(g.prompt), list(range(len(g.prompt))), [0] * len(g.prompt), [], []
        p = len(g.prompt)
        for k, reply in enumerate(g.replies, start=1):
            start = len(ids)
            # Token j of the reply is predicted at the slot before it: the prompt's last slot for j = 0.
            read += [(p - 1 if j == 0 else start + j - 1, t, k) for j, t in enumerate(reply)]
            ids += reply
            rope += range(p, p + len(reply))
            seg += [k] * len(reply)
            last.append(len(ids) - 1)
        rows.append((ids, rope, seg, last))
        reads.append(read)
    b, width, k_max = len(groups), max(len(r[0]) for r in rows), max(len(r) for r in reads)
    out = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "rope": torch.zeros(b, width, dtype=torch.long),
        "segment": torch.full((b, width), -1, dtype=torch.long),
        "read": torch.zeros(b, k_max, dtype=torch.long),
        "read_target": torch.full((b, k_max), pad_id, dtype=torch.long),
        "read_reply": torch.full((b, k_max), -1, dtype=torch.long),
        "last": torch.tensor([r[3] for r in rows]),
        "reply_len": torch.tensor([[len(r) for r in g.replies] for g in groups]),
    }
    for i, ((ids, rope, seg, _), read) in enumerate(zip(rows, reads, strict=True)):
        out["input_ids"][i, : len(ids)] = torch.tensor(ids)
        out["rope"][i, : len(ids)] = torch.tensor(rope)
        out["segment"][i, : len(ids)] = torch.tensor(seg)
        out["read"][i, : len(read)] = torch.tensor([r[0] for r in read])
        out["read_target"][i, : len(read)] = torch.tensor([r[1] for r in read])
        out["read_reply"][i, : len(read)] = torch.tensor([r[2] - 1 for r in read])
    out["tokens"] = torch.tensor([sum(n * len(g.prompt) + sum(map(len, g.replies)) for g in groups)])
    return out


def collate_pairs(pairs: list[Pair], pad_id: int) -> Batch:
    """A batch of preference pairs: the group tensors with reply 0 chosen and reply 1 rejected, each pair's `margin`
    (B,), and `ref_logps` (B, 2) when every pair carries precomputed reference log-probabilities."""
    batch = collate_groups([Group(p.prompt, [p.chosen, p.rejected]) for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs])
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref for p in pairs])
    return batch


def positions(batch: Batch) -> Positions:
    """The mask and RoPE positions of a batch of groups (no cache)."""
    seg, rope = batch["segment"], batch["rope"]
    t = seg.shape[1]
    slots = torch.arange(t, device=seg.device)
    causal = slots[None, :] <= slots[:, None]  # (T, T): key j no later than query i
    # Key j is visible to query i when it is prompt, or in i's own reply (padding: its own kind, never a real one).
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # (B, T, T)
    return Positions(slots, t, (causal & visible)[:, None], causal=False, rope=rope)


def reply_logps(model: nn.Module, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
    """(summed log-probability of each reply (B, n), negative log-likelihood of every read token (B, K), zero at
    padding reads). Differentiable; float32."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast_for(device):
        logits = model(batch["input_ids"], positions(batch), keep=batch["read"])  # (B, K, V)
    b, k, v = logits.shape
    real = batch["read_reply"] >= 0
    nll = token_nll(logits.reshape(b * k, v), batch["read_target"].reshape(-1)).view(b, k) * real
    n = batch["reply_len"].shape[1]
    sums = torch.zeros(b, n + 1, device=device).scatter_add(1, batch["read_reply"] + 1, -nll)  # column 0: padding
    return sums[:, 1:], nll


def reply_scores(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """A reward model's score of each reply (B, n), read at the reply's last token."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast_for(device):
        scores = model(batch["input_ids"], positions(batch), keep=batch["last"])  # (B, n, 1)
    return scores[..., 0].float()
