"""SmolLM2-135M, pulled into the cache: the shipped preference pairs under the real chat template give the
log-probabilities transformers gives, and a reward model made from it loads in transformers with the same scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.align.pairs import collate_pairs, reply_logps
from lmforge.align.prefs import load_pairs
from lmforge.align.reward import RewardScorer, add_score_head
from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.train.sft_data import resolve_data

pytestmark = pytest.mark.slow


def test_pair_log_probs_equal_transformers(smollm2_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_checkpoint(smollm2_checkpoint)
    pairs = load_pairs([resolve_data("builtin:preferences")], tok, 256)[::50]  # 4 pairs, both languages
    with torch.no_grad():
        ours, _ = reply_logps(model, collate_pairs(pairs, 0), torch.device("cpu"))
        peer = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
        for i, pair in enumerate(pairs):
            for k, reply in enumerate((pair.chosen, pair.rejected)):
                logp = peer(torch.tensor([pair.prompt + reply])).logits[0].log_softmax(-1)
                expected = sum(float(logp[len(pair.prompt) - 1 + j, t]) for j, t in enumerate(reply))
                assert float(ours[i, k]) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_reward_model_from_a_tied_llama_scores_as_in_transformers(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model, tok = load_checkpoint(smollm2_checkpoint)
    torch.manual_seed(0)
    add_score_head(model, tok, std=0.1)
    save_checkpoint(tmp_path / "rm", model.cfg, model.state_dict(), tok, make_lineage("test"))
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    replies = ["2 + 3 = 5.", "It is hard to say."]
    ours = RewardScorer(tmp_path / "rm").score(messages, replies)
    peer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    with torch.no_grad():
        for reply, score in zip(replies, ours, strict=True):
            text = tok.render_chat([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
            theirs = float(peer(torch.tensor([tok.encode(text.rstrip())])).logits[0, 0])
            assert score == pytest.approx(theirs, rel=1e-4, abs=1e-4)
