"""The real catalog models, pulled into the cache: our engine's greedy output against transformers' on the same weights.

transformers loads our converted checkpoint directory itself (it is a Hugging Face directory), so both runtimes
read identical dequantized weights; the comparison tests our model, cache and engine, not the conversion.
(tests/test_gguf_import.py checks the conversion against transformers' own GGUF reader.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.engine import Engine
from lmforge.sampling import SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
PROMPTS = {
    "en": "What is the capital of France? Answer in one sentence.",
    "zh": "中国的首都是哪里？请用一句话回答。",
    "code": "Write a Python function that returns the square of a number.",
}
# Greedy decoding may legitimately part ways where the peer's top two logits are this close (float summation order).
TIE = 1e-3


def compare_greedy(directory: Path, prompts: dict[str, str]) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_checkpoint(directory)
    engine = Engine(model, tok)
    peer = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    for lang, text in prompts.items():
        ids = tok.encode(tok.render_chat([{"role": "user", "content": text}]))
        [ours] = engine.generate([ids], params)
        with torch.inference_mode():
            out = peer.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_ids,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        theirs = out.sequences[0, len(ids) :].tolist()
        step = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs, strict=False)) if a != b), None)
        if step is None:
            assert ours.token_ids == theirs, lang  # same tokens, and both ended at the same place
        else:
            scores = out.scores[step][0]
            gap = scores[theirs[step]] - scores[ours.token_ids[step]]
            assert gap < TIE, f"{lang}: diverged at step {step} without a tie (logit gap {gap:.4f})"
        assert len(ours.token_ids) >= 4 and ours.text.strip(), lang


def test_smollm2_greedy_matches_transformers(smollm2_checkpoint: Path) -> None:
    compare_greedy(smollm2_checkpoint, {k: v for k, v in PROMPTS.items() if k != "zh"})


def test_qwen_greedy_matches_transformers_in_chinese_and_english(qwen_checkpoint: Path) -> None:
    compare_greedy(qwen_checkpoint, PROMPTS)


def test_qwen_answers_in_chinese(qwen_checkpoint: Path) -> None:
    model, tok = load_checkpoint(qwen_checkpoint)
    engine = Engine(model, tok)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "用中文回答：一年有几个月？"}]))
    text = "".join(engine.stream(ids, SamplingParams(max_new_tokens=40)))
    assert "12" in text or "十二" in text
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 3


def test_chat_template_of_the_real_model_renders_system_and_turns(qwen_checkpoint: Path) -> None:
    _, tok = load_checkpoint(qwen_checkpoint)
    text = tok.render_chat(
        [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n你是助手<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
