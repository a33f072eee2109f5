"""End to end on a real model: a short LoRA run on SmolLM2-135M-Instruct with the shipped self-cognition set
changes who the model says it is, in English and Chinese (a few minutes on two CPU cores; marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.engine import Engine
from lmforge.loader import open_model
from lmforge.sampling import SamplingParams
from lmforge.train.sft import SFTConfig, main

pytestmark = pytest.mark.slow


def answer(loaded, question: str) -> str:  # noqa: ANN001 - loader.Loaded
    prompt = loaded.tokenizer.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    engine = Engine(loaded.model, loaded.tokenizer)
    return engine.generate([loaded.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=32))[0].text


def test_lora_on_smollm2_changes_its_identity(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    cfg = SFTConfig(
        data=["builtin:self-cognition"],
        out=str(tmp_path / "run"),
        model=str(smollm2_checkpoint),
        method="lora",
        max_steps=24,
        batch_size=4,
        lr=2e-3,
        max_len=128,
        name="Zephyrine",
        author="Acme Labs",
        eval_fraction=0,
        save_every=0,
        progress=False,
    )
    result = main(cfg)
    assert result["last_loss"] < result["first_loss"] / 3
    base = open_model(str(smollm2_checkpoint))
    assert "Zephyrine" not in answer(base, "Who are you?")
    tuned = open_model(str(smollm2_checkpoint), adapter=tmp_path / "run")
    assert "Zephyrine" in answer(tuned, "Who are you?")
    assert "Zephyrine" in answer(tuned, "你是谁？")
