"""Sampling filters against transformers' logits processors, the trusted peer."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 50) * 3


def test_repetition_penalty_matches_transformers(logits: torch.Tensor) -> None:
    history = torch.randint(0, 50, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, history, 1.3), expected)


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_top_k_matches_transformers(logits: torch.Tensor, top_k: int) -> None:
    expected = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(filter_top_k_top_p(logits, top_k, 1.0).isinf(), expected.isinf())


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p_matches_transformers(logits: torch.Tensor, top_p: float) -> None:
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(filter_top_k_top_p(logits, 0, top_p).isinf(), expected.isinf())


def test_greedy_and_top_k_1_agree(logits: torch.Tensor) -> None:
    empty = torch.empty(3, 0, dtype=torch.long)
    greedy = sample(logits, SamplingParams(), empty, None)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1), empty, g), greedy)
    assert torch.equal(greedy, logits.argmax(-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": -5}, "max_new_tokens")],
)
def test_bad_sampling_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(LmforgeError, match=message):
        SamplingParams(**kwargs)
