"""`lmforge rm`: a reward model learns a planted preference on CPU, its checkpoint loads in transformers as
AutoModelForSequenceClassification with the same scores, and `rm eval` / `rm score` report on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.align.reward import RewardScorer, pad_for_scores
from lmforge.checkpoint import load_checkpoint
from lmforge.tokenizer import Tokenizer
from tests.align.conftest import planted_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(base: Path, planted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "run"
    args = ["rm", "train", "--model", str(base), "--data", str(planted), "--out", str(out), "--method", "full",
            "--lr", "2e-3", "--max-steps", "30", "--batch-size", "8", "--eval-every", "15", "--max-len", "96"]
    assert cli.main(args) == 0
    return out


def test_learns_the_planted_preference(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 15, 30] and evals[-1]["eval_accuracy"] > 0.9
    assert {"accuracy", "margin", "loss"} <= set(log[1])
    # Prompts it never saw (other numbers, so other token sequences), scored by `rm eval`.
    unseen = write_jsonl(tmp_path / "unseen.jsonl", planted_records(140)[100:])
    capsys.readouterr()
    assert cli.main(["rm", "eval", "--model", str(trained), "--data", str(unseen), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 40 and result["accuracy"] > 0.9 and result["margin"] > 0
    lineage = json.loads((trained / "lineage.json").read_text())
    assert lineage["kind"] == "reward_model" and lineage["data"]["train_pairs"] == 90


def test_transformers_loads_it_as_a_sequence_classifier_with_the_same_scores(trained: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(trained / "model").eval()
    assert hf.config.num_labels == 1
    scorer = RewardScorer(trained)
    tok = scorer.tokenizer
    messages = [{"role": "user", "content": "How is the apple 3?"}]
    replies = ["Thank you, the apple is fine.", "No apple.", "谢谢，苹果很好。"]
    ours = scorer.score(messages, replies)
    texts = [tok.render_chat([*messages, {"role": "assistant", "content": r}], add_generation_prompt=False).rstrip()
             for r in replies]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    pad = hf.config.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # right-padded, as a batch
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, 0]
    torch.testing.assert_close(torch.tensor(ours), theirs, atol=1e-4, rtol=1e-4)
    assert ours[0] > ours[1]


def test_rm_score_prints_one_score_per_reply(trained: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    args = ["rm", "score", "--model", str(trained), "--prompt", "How is the river 5?", "--reply",
            "Thank you, the river is fine.", "--reply", "No river.", "--json"]
    assert cli.main(args) == 0
    scored = json.loads(capsys.readouterr().out)
    assert [s["reply"] for s in scored] == ["Thank you, the river is fine.", "No river."]
    assert scored[0]["score"] > scored[1]["score"]


def test_pad_never_ends_a_reply_and_lms_are_refused(tiny_tokenizer: Tokenizer, base: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert pad_for_scores(tiny_tokenizer) == tiny_tokenizer.backend.token_to_id("<|endoftext|>")
    assert pad_for_scores(tiny_tokenizer) != tiny_tokenizer.eos_token_ids[0]
    assert load_checkpoint(base)[0].cfg.num_labels == 0
    assert cli.main(["rm", "score", "--model", str(base), "--prompt", "hi", "--reply", "yo"]) == 1
    assert "is a language model, not a reward model" in capsys.readouterr().err
