"""`lmforge tokenizer train`: a byte-level BPE tokenizer trained with HF `tokenizers`, bilingual by design.

- Pre-tokenization splits text before BPE sees it: English-style contractions, runs of letters of alphabetic
  scripts with their leading space, runs of Han characters (so merges learn multi-character Chinese words but
  never glue Chinese to Latin letters), single digits (numbers stay arithmetic-friendly), punctuation runs and
  whitespace, as GPT-4/Qwen-style patterns do. Byte-level mapping after it means any Unicode round-trips.
- Special tokens `<|endoftext|>` (document end, the pretraining EOS) and the ChatML pair `<|im_start|>` /
  `<|im_end|>`, with a ChatML chat template, so a model pretrained on it can be fine-tuned for chat as is.
- Saved through `lmforge.tokenizer.Tokenizer.save`: `tokenizer.json` + `tokenizer_config.json` that transformers
  loads, plus `tokenizer_report.json` with bytes per token on the shipped Chinese and English held-out text beside
  the catalog tokenizers (Qwen2.5, SmolLM2) when they are in the cache.
It does not tokenize corpora into shards (`data/tokenize.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.io import InputIssues, input_files, read_records
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, write_json
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"| ?[^\P{L}\p{Han}]+"  # letters that are not Han, with one leading space
    r"| ?\p{Han}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PEERS = ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")


@dataclass
class TokenizerTrainConfig:
    data: list[str]
    out: str
    vocab_size: int = 8192
    min_frequency: int = 2
    max_chars: int | None = None  # train on at most this many characters (the first ones, in input order)
    overwrite: bool = False


def build_backend():  # noqa: ANN201 - tokenizers types are imported lazily
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _texts(paths: list[str], max_chars: int | None, issues: InputIssues) -> Iterator[str]:
    budget = max_chars if max_chars is not None else float("inf")
    for record in read_records(input_files(paths), issues):
        if budget <= 0:
            return
        budget -= len(record["text"])
        yield record["text"]


def train(cfg: TokenizerTrainConfig) -> Tokenizer:
    from tokenizers import pre_tokenizers, trainers

    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise LmforgeError(f"--vocab-size {cfg.vocab_size}: must exceed the 256 bytes plus special tokens")
    backend = build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    issues = InputIssues()
    backend.train_from_iterator(_texts(cfg.data, cfg.max_chars, issues), trainer)
    return Tokenizer(backend, CHATML_TEMPLATE, bos_token=None, eos_tokens=["<|endoftext|>", "<|im_end|>"])


def bytes_per_token(encode, text: str) -> float:  # noqa: ANN001 - any str -> ids callable
    return len(text.encode()) / max(1, len(encode(text)))


def compression_report(tok: Tokenizer) -> dict:
    """Bytes per token on held-out Chinese and English text: ours, and the catalog tokenizers already cached."""
    from importlib.resources import files

    from lmforge.catalog import entry_dir

    texts = {lang: (files("lmforge.datasets") / f"heldout_{lang}.txt").read_text("utf-8") for lang in ("zh", "en")}
    tokenizers = {"lmforge (this)": tok}
    for name in PEERS:
        directory = entry_dir(name) / "checkpoint"
        if (directory / "tokenizer.json").is_file():
            tokenizers[name] = Tokenizer.load(directory)
    return {
        name: {lang: round(bytes_per_token(t.encode, text), 3) for lang, text in texts.items()}
        for name, t in tokenizers.items()
    } | {"vocab_sizes": {name: t.vocab_size for name, t in tokenizers.items()}}


def main(cfg: TokenizerTrainConfig) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite and not (out / "tokenizer_report.json").is_file():
        raise LmforgeError(f"{out}: not empty and not a trained tokenizer; choose another --out or pass --overwrite")
    tok = train(cfg)
    report = {"config": dataclasses.asdict(cfg), "vocab_size": tok.vocab_size, "bytes_per_token": {}}
    report["bytes_per_token"] = compression_report(tok)
    with atomic_dir(out) as tmp:
        tok.save(tmp)
        write_json(tmp / "tokenizer_report.json", report)
    return report

