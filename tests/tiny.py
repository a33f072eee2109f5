"""Tiny models and a tiny bilingual tokenizer, made in a second so that tests need no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.config import PRESETS
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the previous ones.",
    "你好，今天过得怎么样？我很好，谢谢。",
    "机器学习让计算机从数据中学习规律。",
    "北京是中国的首都，上海是最大的城市。",
]


def make_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return Tokenizer(backend, CHATML, bos_token=None, eos_tokens=["<|im_end|>", "<|endoftext|>"])


def make_tiny_model(preset: str = "llama-tiny", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(PRESETS[preset])
    model.init_weights(std=0.2)  # large enough that logits differ clearly between tokens
    return model.eval()


def write_tiny_reward_model(directory: Path, seed: int = 1, vocab_size: int = 384) -> Path:
    """An untrained reward model (random score head, large enough that replies score apart), saved as `rm train`
    saves one. Its tokenizer is smaller than the policy's tiny one, so the two tokenize differently."""
    from lmforge.align.reward import add_score_head
    from lmforge.checkpoint import make_lineage, save_checkpoint

    tok = make_tiny_tokenizer(vocab_size)
    model = add_score_head(make_tiny_model("llama-tiny", seed), tok, std=1.0)
    save_checkpoint(directory, model.cfg, model.state_dict(), tok, make_lineage("tiny test reward model"))
    return directory
