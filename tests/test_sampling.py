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
from lmforge.sampling import SamplingParams, apply_repetition_penalty, candidates, sample


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 50) * 3


def test_repetition_penalty_matches_transformers(logits: torch.Tensor) -> None:
    history = torch.randint(0, 50, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, history, 1.3), expected)


def allowed(logits: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    chosen, ids = candidates(logits, top_k, top_p)
    return [set(row_ids[row.isfinite()].tolist()) for row, row_ids in zip(chosen, ids, strict=True)]


def expected(warped: torch.Tensor) -> list[set[int]]:
    return [set(row.isfinite().nonzero().flatten().tolist()) for row in warped]


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_top_k_matches_transformers(logits: torch.Tensor, top_k: int) -> None:
    assert allowed(logits, top_k, 1.0) == expected(TopKLogitsWarper(top_k)(None, logits.clone()))


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(top_p: float) -> None:
    # A large vocabulary with a flat tail, so that the nucleus grows past the first window of candidates.
    torch.manual_seed(1)
    logits = torch.randn(2, 5000) * 0.5
    assert allowed(logits, 0, top_p) == expected(TopPLogitsWarper(top_p)(None, logits.clone()))


def test_top_k_then_top_p_matches_transformers(logits: torch.Tensor) -> None:
    warped = TopPLogitsWarper(0.6)(None, TopKLogitsWarper(10)(None, logits.clone()))
    assert allowed(logits, 10, 0.6) == expected(warped)


def test_samples_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    draws = torch.stack([sample(logits, params, torch.empty(1, 0, dtype=torch.long), g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


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
