"""Preference data planted so that a tiny model can learn it, and a tiny base checkpoint to train from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.checkpoint import make_lineage, save_checkpoint
from lmforge.tokenizer import Tokenizer
from tests.tiny import make_tiny_model

THINGS_EN = ["apple", "river", "music", "garden", "winter", "coffee", "window", "forest", "letter", "bridge"]
THINGS_ZH = ["苹果", "河流", "音乐", "花园", "冬天", "咖啡", "窗户", "森林", "信件", "桥梁"]


def planted_records(n: int) -> list[dict]:
    """Chosen replies thank the asker (thank you / 谢谢); rejected ones do not. Half English, half Chinese."""
    records = []
    for i in range(n):
        if i % 2:
            thing = THINGS_ZH[i // 2 % len(THINGS_ZH)]
            prompt, chosen, rejected = f"{thing}{i}怎么样？", f"谢谢，{thing}很好。", f"{thing}不好。"
        else:
            thing = THINGS_EN[i // 2 % len(THINGS_EN)]
            prompt, chosen, rejected = f"How is the {thing} {i}?", f"Thank you, the {thing} is fine.", f"No {thing}."
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "planted.jsonl", planted_records(100))


@pytest.fixture(scope="package")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("base")
    model = make_tiny_model("qwen2-tiny")
    save_checkpoint(directory, model.cfg, model.state_dict(), tiny_tokenizer, make_lineage("tiny test model"))
    return directory
