"""`lmforge data prefs`: a tiny policy's sampled replies ranked by a reward model (checked against scoring them
here), by a reward function (which sees the record's columns), by a judge over real HTTP (both orders) or a local
one; resumed runs add no duplicates and equal an uninterrupted run; the output loads as `rm train` / `dpo` read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.align.prefgen import JudgeRanker, PrefsConfig, PromptRecord, best_and_worst, sample_replies, to_prompt
from lmforge.align.prefs import load_pairs, to_conversation
from lmforge.align.reward import RewardScorer, add_score_head
from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.engine import Engine
from lmforge.train.sft_data import BadRecord
from tests.align.conftest import write_jsonl
from tests.eval.test_judge import judge_url  # noqa: F401 - the stub judge server, a fixture
from tests.serve_server import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    {"prompt": "How is the apple?"},
    {"prompt": "北京在哪里？", "system": "Answer briefly."},
    {"messages": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello there?"}]},
]
LONGER_FN = '''
import json
from pathlib import Path


def longer(prompts, completions, **columns):
    with (Path(__file__).parent / "calls.jsonl").open("a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "columns": columns}) + "\\n")
    return [len(c) for c in completions]
'''


def _run(prompts: Path, out: Path, policy: Path, *extra: str, status: int = 0) -> None:
    args = ["data", "prefs", "--prompts", str(prompts), "--model", str(policy), "--out", str(out), "--k", "4",
            "--max-new-tokens", "8", "--keep-candidates", *extra]
    assert cli.main(args) == status


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _loads_as_pairs(out: Path, base: Path) -> int:
    return len(load_pairs([out], load_checkpoint(base)[1], 256))


@pytest.fixture(scope="module")
def reward_model(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained score head on the tiny base: arbitrary but fixed scores are all ranking needs."""
    model, tok = load_checkpoint(base)
    torch.manual_seed(0)
    add_score_head(model, tok, std=1.0)
    out = tmp_path_factory.mktemp("rm")
    save_checkpoint(out, model.cfg, model.state_dict(), tok, make_lineage("untrained score head"))
    return out


@pytest.fixture(scope="module")
def reward_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fn") / "rank.py"
    path.write_text(LONGER_FN)
    return path


def test_reward_model_keeps_its_best_and_worst_reply(base: Path, reward_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pairs.jsonl"
    _run(write_jsonl(tmp_path / "p.jsonl", PROMPTS), out, base, "--reward", str(reward_model))
    assert "prefs: 3 prompts, 3 pairs written, 0 skipped" in capsys.readouterr().out
    records = _records(out)
    assert records[2]["prompt"] == PROMPTS[2]["messages"] and records[1]["system"] == "Answer briefly."
    scorer = RewardScorer(reward_model)
    engine = Engine(*load_checkpoint(base))
    for index, record in enumerate(records):
        messages, chosen, rejected = to_conversation(record)  # the conversation `rm train` and `dpo` will read
        replies = record["provenance"]["candidates"]
        scores = scorer.score(messages, replies)
        assert chosen == replies[scores.index(max(scores))] and rejected == replies[scores.index(min(scores))]
        assert record["provenance"]["scores"] == pytest.approx(scores, abs=1e-5)
        assert record["provenance"]["seed"] == index and record["provenance"]["k"] == 4
        # The seed in the provenance reproduces the samples.
        item, cfg = PromptRecord(messages, record["prompt"]), PrefsConfig(prompts="", out="", max_new_tokens=8)
        assert list(dict.fromkeys(sample_replies(engine, item, cfg, index))) == replies
    assert _loads_as_pairs(out, base) == 3


def test_a_reward_function_ranks_and_receives_the_columns(base: Path, reward_fn: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    alpaca = [{"instruction": "Translate.", "input": "Good morning.", "output": "早上好。", "lang": "zh"},
              {"instruction": "Name a colour.", "input": "", "output": "Red.", "lang": "en"}]
    overlong = {"instruction": "word " * 300, "output": ""}  # more than the tiny policy's 256-token context
    out = tmp_path / "pairs.jsonl"
    _run(write_jsonl(tmp_path / "p.jsonl", [*alpaca, overlong]), out, base, "--reward-fn", f"{reward_fn}:longer")
    assert "3 prompts, 2 pairs written, 1 skipped (1 too long)" in capsys.readouterr().out
    calls = [json.loads(line) for line in (reward_fn.parent / "calls.jsonl").read_text().splitlines()][-2:]
    for call, record in zip(calls, alpaca, strict=True):
        n = len(call["completions"])
        assert call["columns"] == {"output": [record["output"]] * n, "lang": [record["lang"]] * n}
    assert calls[0]["prompts"][0] == "Translate.\n\nGood morning." and calls[1]["prompts"][0] == "Name a colour."
    records = _records(out)
    for record in records:
        lengths = [len(c) for c in record["provenance"]["candidates"]]
        assert len(record["chosen"]) == max(lengths) > len(record["rejected"]) == min(lengths)
        assert record["provenance"]["scores"] == lengths
    assert [r["prompt"] for r in records] == ["Translate.\n\nGood morning.", "Name a colour."]
    assert _loads_as_pairs(out, base) == 2


def test_judge_ranking_is_a_round_robin_in_both_orders() -> None:
    asked = []

    def longer(question: str, a: str, b: str) -> str:
        asked.append((a, b))
        return "Longer is better. " + ("[[C]]" if len(a) == len(b) else "[[A]]" if len(a) > len(b) else "[[B]]")

    item = to_prompt({"prompt": "Why?"})
    replies = ["ab", "abcd", "a", "abc"]
    scores = JudgeRanker(longer, "longer").scores(item, replies)
    assert scores == [1.0, 3.0, 0.0, 2.0] and best_and_worst(scores) == (1, 2)
    assert len(asked) == 12 and len(set(asked)) == 12  # 6 pairs, each in both orders
    biased = JudgeRanker(lambda q, a, b: "[[A]]", "first")
    assert biased.scores(item, replies) == [1.5] * 4 and best_and_worst([1.5] * 4) is None
    assert best_and_worst([2.0, 5.0, 5.0, 0.0, 0.0]) == (1, 3)  # ties go to the earlier sample


def test_judge_over_http(base: Path, judge_url: str, tmp_path: Path,  # noqa: F811 - the imported fixture
                         capsys: pytest.CaptureFixture) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "longer.jsonl"
    _run(prompts, out, base, "--judge-url", judge_url, "--judge-model", "longer")
    for record in _records(out):
        lengths = [len(c) for c in record["provenance"]["candidates"]]
        assert len(record["chosen"]) == max(lengths) and len(record["rejected"]) == min(lengths)
        assert record["provenance"]["ranker"] == f"judge:longer@{judge_url}"
    assert _loads_as_pairs(out, base) == len(_records(out)) > 0
    # A judge that always prefers what it sees first is cancelled by the swap: every reply ties, no pair.
    _run(prompts, tmp_path / "first.jsonl", base, "--judge-url", judge_url, "--judge-model", "first")
    assert "0 pairs written, 3 skipped (3 tied)" in capsys.readouterr().out
    _run(prompts, tmp_path / "none.jsonl", base, "--judge-url", judge_url, "--judge-model", "undecided")
    assert "3 skipped (3 tied), 18 unreadable verdicts" in capsys.readouterr().out  # 6 pairs per prompt


def test_a_local_judge_runs(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    judge = write_tiny_checkpoint(tmp_path / "judge")  # a long context, room for the judge's prompt
    _run(prompts, tmp_path / "out.jsonl", base, "--judge-local", str(judge), "--judge-max-tokens", "3", "--k", "2")
    # A random tiny model gives no verdict: the one pair is unreadable, so no pair is written.
    assert "0 pairs written, 1 skipped (1 tied), 1 unreadable verdicts" in capsys.readouterr().out


def test_resume_skips_done_prompts_and_equals_an_uninterrupted_run(base: Path, reward_fn: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about {i}."} for i in range(5)]
                          + [{"prompt": "Tell me about 0."}])  # a repeated prompt is written once
    ranker = ("--reward-fn", f"{reward_fn}:longer")
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    _run(prompts, whole, base, *ranker)
    _run(prompts, part, base, *ranker, "--limit", "2")
    _run(prompts, part, base, *ranker, status=1)  # it holds records: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    with part.open("a") as f:
        f.write('{"prompt": "Tell me ab')  # a run killed mid-write
    _run(prompts, part, base, *ranker, "--resume")
    assert part.read_text() == whole.read_text()
    assert [r["prompt"] for r in _records(part)] == [f"Tell me about {i}." for i in range(5)]
    assert _loads_as_pairs(part, base) == 5


def test_prompt_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert to_prompt({"prompt": "Hi", "id": 7}).columns == {"id": 7}
    item = to_prompt({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}]})
    assert item.question == "user: a\n\nassistant: b\n\nuser: c" and isinstance(item.prompt, list)
    for bad in ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                {"output": "no prompt"}, {"prompt": 3}, "text"):
        with pytest.raises(BadRecord):
            to_prompt(bad)
    assert cli.main(["data", "prefs", "--prompts", "x.txt", "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "exactly one ranker" in capsys.readouterr().err
