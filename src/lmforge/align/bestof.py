"""Best-of-n sampling: N replies sampled together, scored by a reward model, the highest-scored one kept.

The N samples are one `Engine.generate` batch of N copies of the prompt, so the prompt is prefilled once and its
keys/values copied into the other rows. They are sampled, never greedy: N greedy samples would be N copies of one
reply, so n > 1 with temperature 0 is refused rather than silently given a temperature. With a seed the whole
result is reproducible (one generator draws every row's tokens, in row order). The reward model sees the
conversation as messages and renders it with its own chat template, so it may use another tokenizer than the
policy. Ties go to the earlier sample.
This module does not load models or parse flags (cli.py, chat.py) and does not serve requests (serve/app.py runs
its candidates through the scheduler and ranks them with the same `RewardScorer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams

if TYPE_CHECKING:
    from lmforge.align.reward import RewardScorer
    from lmforge.engine import Engine


@dataclass
class Candidate:
    text: str
    tokens: int  # completion tokens, the end-of-sequence token included
    finish_reason: str  # "stop" or "length"
    score: float


@dataclass
class BestOf:
    candidates: list[Candidate]
    best: int  # index into candidates

    @property
    def text(self) -> str:
        return self.candidates[self.best].text

    def to_json(self) -> dict:
        return {"text": self.text, "best": self.best, "candidates": [asdict(c) for c in self.candidates]}


def check_best_of(n: int, temperature: float, flag: str = "--best-of") -> None:
    if n < 1:
        raise LmforgeError(f"{flag} must be at least 1, got {n}")
    if n > 1 and temperature == 0:
        raise LmforgeError(
            f"{flag} {n} needs sampling: with temperature 0 (greedy) all {n} replies would be the same; "
            "set a temperature, e.g. --temperature 0.8"
        )


def best_index(scores: list[float]) -> int:
    """The highest score's index; the first one on a tie."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def best_of(
    engine: Engine,
    scorer: RewardScorer,
    messages: list[dict[str, str]],
    n: int,
    params: SamplingParams,
    prompt_ids: list[int] | None = None,
) -> BestOf:
    """Sample n replies to `messages` and score them. prompt_ids: what the policy continues, when it is not the
    messages in the policy's chat template (a raw prompt whose messages exist only for the reward model)."""
    check_best_of(n, params.temperature)
    if prompt_ids is None:
        tok = engine.tokenizer
        prompt_ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
    outs = engine.generate([prompt_ids] * n, params)
    scores = scorer.score(messages, [c.text for c in outs])
    candidates = [
        Candidate(c.text, c.stats.completion_tokens, c.stats.finish_reason or "length", s)
        for c, s in zip(outs, scores, strict=True)
    ]
    return BestOf(candidates, best_index(scores))
