"""A prompt and its replies in one row give each reply exactly what prompt+reply run alone gives: log-probabilities
(and their gradients) under a language model, scores under a reward model. LoRA with its adapters off is the base."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.align.pairs import Group, collate_groups, reply_logps, reply_scores
from lmforge.align.reward import add_score_head
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import LoraConfig, adapters_off, apply_lora
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
GROUPS = [Group([1, 5, 7, 9], [[3, 4, 2], [8, 2]]), Group([6, 2], [[11, 12, 13, 14, 2], [9, 2]])]


def alone_logp(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Summed log-probability of `reply` after `prompt`, from one plain causal forward of the two."""
    logp = model(torch.tensor([prompt + reply]))[0].log_softmax(-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(reply))


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_packed_log_probs_and_gradients_equal_separate_forwards(preset: str) -> None:
    ours = make_tiny_model(preset).requires_grad_(True)
    peer = copy.deepcopy(ours)
    batch = collate_groups(GROUPS, pad_id=0)
    logps, nll = reply_logps(ours, batch, CPU)
    expected = torch.stack([torch.stack([alone_logp(peer, g.prompt, r) for r in g.replies]) for g in GROUPS])
    torch.testing.assert_close(logps, expected)
    assert nll.shape == batch["read"].shape and float(nll.detach()[batch["read_reply"] < 0].abs().sum()) == 0
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # any mix, as a preference loss weighs its replies
    (logps * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), peer.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert int(batch["tokens"]) == 2 * 4 + 3 + 2 + 2 * 2 + 5 + 2


def test_scores_are_read_at_each_reply_last_token(tiny_tokenizer: Tokenizer) -> None:
    model = add_score_head(make_tiny_model("llama-tiny"), tiny_tokenizer)
    with torch.no_grad():
        scores = reply_scores(model, collate_groups(GROUPS, pad_id=0), CPU)
        expected = [[float(model(torch.tensor([g.prompt + r]))[0, -1, 0]) for r in g.replies] for g in GROUPS]
    torch.testing.assert_close(scores, torch.tensor(expected))


def test_lora_with_adapters_off_is_exactly_the_base() -> None:
    base = make_tiny_model("qwen2-tiny")
    model = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, dropout=0.1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # a trained adapter: B is no longer zero
        ids = torch.tensor([[5, 9, 100, 42, 7, 300]])
        assert not torch.allclose(model(ids), base(ids))
        with adapters_off(model):
            assert torch.equal(model(ids), base(ids))
        assert not torch.allclose(model(ids), base(ids))  # switched back on
