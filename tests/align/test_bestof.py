"""Best-of-n: the candidate kept is the one the reward model, scoring each reply on its own, ranks highest; the CLI
shows every candidate with --json, keeps the chosen reply in a chat's history, and refuses flags that cannot work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.align import bestof
from lmforge.align.bestof import best_of
from lmforge.align.reward import RewardScorer
from lmforge.checkpoint import load_checkpoint
from lmforge.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams
from tests.tiny import write_tiny_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

ASK = [{"role": "user", "content": "How is the river 5? 河流怎么样？"}]


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reward_model(tmp_path_factory.mktemp("bestof") / "rm")


@pytest.fixture(scope="module")
def scorer(reward: Path) -> RewardScorer:
    return RewardScorer(reward, device="cpu")


@pytest.fixture(scope="module")
def engine(base: Path) -> Engine:
    model, tok = load_checkpoint(base, device="cpu")
    return Engine(model, tok)


def sampled(seed: int, max_new_tokens: int = 10) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)


def one_by_one(scorer: RewardScorer, messages: list[dict], replies: list[str]) -> list[float]:
    return [scorer.score(messages, [r])[0] for r in replies]


def test_best_of_returns_the_argmax_candidate(engine: Engine, scorer: RewardScorer) -> None:
    bests = []
    for seed in range(4):
        result = best_of(engine, scorer, ASK, 4, sampled(seed))
        texts = [c.text for c in result.candidates]
        assert len(set(texts)) > 1  # sampled apart, so the choice matters
        scores = one_by_one(scorer, ASK, texts)
        assert result.best == max(range(4), key=scores.__getitem__)
        assert [c.score for c in result.candidates] == pytest.approx(scores, abs=1e-4)
        assert result.text == texts[result.best]
        assert all(c.tokens >= 1 and c.finish_reason in ("stop", "length") for c in result.candidates)
        bests.append(result.best)
    assert set(bests) != {0}  # not merely the first sample
    again = best_of(engine, scorer, ASK, 4, sampled(0))
    assert again.to_json() == best_of(engine, scorer, ASK, 4, sampled(0)).to_json()  # seeded: reproducible


def test_greedy_best_of_is_refused(engine: Engine, scorer: RewardScorer) -> None:
    with pytest.raises(LmforgeError, match="temperature"):
        best_of(engine, scorer, ASK, 3, SamplingParams(max_new_tokens=4))


def test_generate_json_lists_every_candidate(base: Path, reward: Path, scorer: RewardScorer,
                                             capsys: pytest.CaptureFixture) -> None:
    prompt = "The quick brown"
    args = ["generate", prompt, "--model", str(base), "--best-of", "3", "--reward", str(reward),
            "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "8"]
    capsys.readouterr()
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    candidates = out["candidates"]
    assert len(candidates) == 3 and all({"text", "score", "tokens", "finish_reason"} <= set(c) for c in candidates)
    # Without --chat the reward model sees the raw prompt as one user message.
    scores = one_by_one(scorer, [{"role": "user", "content": prompt}], [c["text"] for c in candidates])
    assert [c["score"] for c in candidates] == pytest.approx(scores, abs=1e-4)
    assert out["best"] == max(range(3), key=scores.__getitem__) and out["text"] == candidates[out["best"]]["text"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == out["text"] + "\n"  # the same seed, the same winner, text only


def test_flags_that_cannot_work_are_refused(base: Path, reward: Path, capsys: pytest.CaptureFixture) -> None:
    run = ["generate", "hi", "--model", str(base), "--temperature", "1"]
    for extra, said in ((["--best-of", "3"], "--best-of N and --reward RM_DIR go together"),
                        (["--reward", str(reward)], "--best-of N and --reward RM_DIR go together"),
                        (["--best-of", "3", "--reward", str(reward), "--temperature", "0"], "temperature 0"),
                        (["--best-of", "0", "--reward", str(reward)], "--best-of must be at least 1")):
        capsys.readouterr()
        assert cli.main(run + extra) == 1
        assert said in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["serve", "--model", str(base), "--best-of", "2"]) == 1
    assert "--best-of needs --reward" in capsys.readouterr().err


def test_chat_keeps_the_chosen_reply_in_the_history(base: Path, reward: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    calls = []

    def spy(engine: Engine, scorer: RewardScorer, messages: list[dict], n: int, params: SamplingParams,
            **kw: object) -> bestof.BestOf:
        result = best_of(engine, scorer, messages, n, params, **kw)
        calls.append(([dict(m) for m in messages], result))
        return result

    monkeypatch.setattr(bestof, "best_of", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello 你好\nand then?\n/exit\n"))
    capsys.readouterr()
    args = ["chat", "--model", str(base), "--quant", "none", "--best-of", "3", "--reward", str(reward),
            "--seed", "2", "--max-new-tokens", "8"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert [len(r.candidates) for _, r in calls] == [3, 3]
    (first_messages, first), (second_messages, second) = calls
    assert first_messages == [{"role": "user", "content": "hello 你好"}]
    assert second_messages == [*first_messages, {"role": "assistant", "content": first.text},
                               {"role": "user", "content": "and then?"}]
    assert first.text in out and second.text in out and "best of 3" in out
