"""Perplexity and bits-per-byte of a model on UTF-8 text files, scored with a sliding window.

The text is tokenized once and cut into windows of `window` tokens that begin `stride` tokens apart. Each window
scores only the tokens the previous one did not reach, so every token is scored exactly once, with at least
`window - stride` tokens of left context (fewer only at the start of the text). Windows of the same shape run
as one batched forward, and the head computes logits only at the scored positions.

A document-boundary token goes before the text (BOS when the tokenizer adds one, else its first end-of-text
token, as lm-evaluation-harness does), so the text's first token is scored too and the byte count is the whole
file:
    perplexity    = exp(NLL / tokens)          NLL in nats, summed over the text's tokens
    bits per byte = NLL / ln 2 / UTF-8 bytes   comparable across tokenizers, unlike perplexity

With a reference model (`--reference`, e.g. the float model beside its quantization) each scored position also
gives KL(reference || model) over the whole next-token distribution and whether both models' top token agree.
Unlike a perplexity difference, which a rounding can lower by luck on a small text, the KL divergence is never
negative and grows with every change to the distribution (llama.cpp's perplexity tool reports the same pair).

Texts shipped with lmforge are named (`heldout`, `heldout-en`, `heldout-zh`; see TEXTS). This module does not
load models (loader.open_model does) and does not compare runs (eval.report does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.progress import track
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.loader import Loaded

# Named texts shipped in lmforge/datasets/, written for this project (see datasets/README.md).
TEXTS: dict[str, tuple[str, ...]] = {
    "heldout": ("heldout_en.txt", "heldout_zh.txt"),
    "heldout-en": ("heldout_en.txt",),
    "heldout-zh": ("heldout_zh.txt",),
}
DEFAULT_WINDOW = 1024
TOKENS_PER_BATCH = 2048  # window tokens per forward: bounds activations and the (B, scored, vocab) logits


@dataclass
class PerplexityConfig:
    model: str | None = None
    text: str = "heldout"  # a file path or a name in TEXTS
    quant: str | None = None
    adapter: str | None = None
    window: int | None = None  # None: min(DEFAULT_WINDOW, the model's context)
    stride: int | None = None  # None: window // 2
    batch_size: int | None = None  # windows per forward; None: TOKENS_PER_BATCH // window
    reference: str | None = None  # a model to compare the distributions with (same tokenizer), loaded float
    progress: bool = True


@dataclass
class Score:
    name: str
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens cover
    nll: float  # summed negative log-likelihood, nats
    kl: float | None = None  # summed KL(reference || model), nats, when scored against a reference
    same_top1: int | None = None  # positions where the reference's most likely next token is the model's too

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll": round(self.nll, 4),
            "perplexity": round(self.perplexity, 4),
            "bits_per_byte": round(self.bits_per_byte, 4),
        } | ({} if self.kl is None else {"kl": self.kl / self.tokens, "same_top1": self.same_top1 / self.tokens})


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed (and scored)
    first: int  # first token scored; tokens before it are context only


# --- texts -----------------------------------------------------------------------------------------------------


def resolve_texts(spec: str) -> list[Path]:
    """A shipped text's name, or a path, as the files to score."""
    if spec in TEXTS:
        root = resources.files("lmforge") / "datasets"
        return [Path(str(root / name)) for name in TEXTS[spec]]
    return [Path(spec).expanduser()]


def read_text(path: Path) -> str:
    """The file as text; a missing, unreadable, non-UTF-8 or empty file is one clear error."""
    if not path.is_file():
        hint = f"give a UTF-8 text file or one of: {', '.join(TEXTS)}"
        raise LmforgeError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; {hint}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start} is invalid); "
            "convert it, e.g. iconv -f GBK -t UTF-8"
        ) from None
    if not text.strip():
        raise LmforgeError(f"{path}: the file is empty; perplexity needs some text")
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the text


# --- scoring ---------------------------------------------------------------------------------------------------


def windows(n: int, window: int, stride: int) -> list[Window]:
    """Sliding windows over n tokens; token 0 is context only (nothing precedes it), every other is scored once."""
    if window < 2 or not 1 <= stride < window:
        raise LmforgeError(f"need window >= 2 and 1 <= stride < window (got window {window}, stride {stride})")
    out, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + window, n)
        out.append(Window(begin, end, scored_to))
        if end == n:
            return out
        begin, scored_to = begin + stride, end


@dataclass
class Sums:
    nll: float = 0.0
    kl: float = 0.0
    same_top1: int = 0


def _batches(n: int, window: int, stride: int, batch_size: int) -> list[list[Window]]:
    groups: dict[tuple[int, int], list[Window]] = {}  # same length and scored count: one batched forward
    for w in windows(n, window, stride):
        groups.setdefault((w.end - w.begin, w.end - w.first), []).append(w)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


@torch.inference_mode()
def score_ids(
    model: Transformer,
    ids: list[int],
    window: int,
    stride: int,
    batch_size: int = 1,
    reference: Transformer | None = None,
    label: str = "",
    progress: bool = True,
) -> Sums:
    """NLL (nats) of ids[1:] summed, each token predicted from up to `window` - 1 tokens before it; with a
    reference, also the summed KL(reference || model) and the count of agreeing top-1 predictions."""
    sums = Sums()
    for batch in track(_batches(len(ids), window, stride, batch_size), label or "scoring", enabled=progress):
        logits, targets = scored_logits(model, ids, batch)  # (N, V), (N,)
        sums.nll += F.cross_entropy(logits, targets, reduction="sum").item()
        if reference is not None:
            ref = torch.log_softmax(scored_logits(reference, ids, batch)[0], -1)
            mine = torch.log_softmax(logits, -1)
            sums.kl += F.kl_div(mine, ref, reduction="sum", log_target=True).item()
            sums.same_top1 += int((ref.argmax(-1) == mine.argmax(-1)).sum())
    return sums


def sum_nll(
    model: Transformer, ids: list[int], window: int, stride: int, batch_size: int = 1, label: str = "", progress=True
) -> float:
    """Summed NLL (nats) of ids[1:], each token predicted from up to `window` - 1 tokens before it."""
    return score_ids(model, ids, window, stride, batch_size, label=label, progress=progress).nll


def scored_logits(model: Transformer, ids: list[int], batch: list[Window]) -> tuple[Tensor, Tensor]:
    """float32 logits (N, V) at the batch's scored positions, and the tokens they predict (N,)."""
    device = next(model.parameters()).device
    length, scored = batch[0].end - batch[0].begin, batch[0].end - batch[0].first
    x = torch.tensor([ids[w.begin : w.end] for w in batch], device=device)  # (B, L)
    # Logits at position p predict token p + 1; the scored tokens are each window's last `scored`.
    at = torch.arange(length - scored - 1, length - 1, device=device).expand(len(batch), scored)  # (B, S)
    logits = model(x, keep=at)  # (B, S, V)
    return logits.flatten(0, 1).float(), x[:, length - scored :].flatten()


def text_ids(tokenizer: Tokenizer, text: str) -> tuple[list[int], int]:
    """Token ids with the boundary token in front, and the UTF-8 bytes that the scored tokens (ids[1:]) cover."""
    ids = tokenizer.encode(text, add_bos=False)
    n_bytes = len(text.encode("utf-8"))
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        boundary = tokenizer.bos_token_id
    else:
        boundary = next(iter(tokenizer.eos_token_ids), tokenizer.bos_token_id)
    if boundary is None:  # nothing to condition the first token on: it becomes context, and its bytes go uncounted
        return ids, n_bytes - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return [boundary, *ids], n_bytes


def score_text(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    name: str,
    window: int,
    stride: int,
    batch_size: int,
    progress: bool = True,
    reference: Transformer | None = None,
) -> Score:
    ids, n_bytes = text_ids(tokenizer, text)
    if len(ids) < 3:  # the boundary token and at least two of the text's own
        raise LmforgeError(f"{name}: the text is shorter than 2 tokens; perplexity needs more text")
    sums = score_ids(model, ids, window, stride, batch_size, reference, f"scoring {name}", progress)
    compared = reference is not None
    return Score(name, len(ids) - 1, n_bytes, sums.nll, *((sums.kl, sums.same_top1) if compared else ()))


def total(scores: list[Score]) -> Score:
    compared = all(s.kl is not None for s in scores)
    fields = ("tokens", "bytes", "nll", *(("kl", "same_top1") if compared else ()))
    return Score("total", *(sum(getattr(s, f) for s in scores) for f in fields))


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    files: list[Path],
    window: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    reference: Transformer | None = None,
) -> dict[str, Any]:
    """Score each file; the result has one entry per file and their total (as JSON-ready dicts)."""
    context = model.cfg.max_seq_len
    window = window or min(DEFAULT_WINDOW, context)
    if window > context:
        raise LmforgeError(f"--window {window} is longer than the model's context ({context} tokens)")
    stride = stride or max(1, window // 2)
    batch_size = batch_size or max(1, TOKENS_PER_BATCH // window)
    texts = [(path, read_text(path)) for path in files]  # every file checked before the slow part
    scores = [
        score_text(model, tokenizer, t, path.name, window, stride, batch_size, progress, reference)
        for path, t in texts
    ]
    return {
        "window": window,
        "stride": stride,
        "texts": [s.to_dict() for s in scores],
        "total": total(scores).to_dict(),
    }


def _check_same_tokens(model: Loaded, reference: Loaded, files: list[Path]) -> None:
    """KL compares distributions position by position: both models must see the same token ids."""
    if model.model.cfg.vocab_size != reference.model.cfg.vocab_size:
        raise LmforgeError(
            f"--reference {reference.directory} has a vocabulary of {reference.model.cfg.vocab_size} tokens, the "
            f"model {model.model.cfg.vocab_size}; KL divergence needs the same tokenizer"
        )
    for path in files:
        text = read_text(path)
        if model.tokenizer.encode(text, add_bos=False) != reference.tokenizer.encode(text, add_bos=False):
            raise LmforgeError(
                f"{path}: --reference {reference.directory} tokenizes this text differently from the model; "
                "KL divergence needs the same tokenizer"
            )


def main(cfg: PerplexityConfig) -> dict[str, Any]:
    from lmforge.loader import open_model

    files = resolve_texts(cfg.text)
    for path in files:
        read_text(path)  # a bad file fails before the model loads
    loaded = open_model(cfg.model, cfg.quant, cfg.adapter)
    reference = None
    if cfg.reference is not None:
        reference = open_model(cfg.reference)
        _check_same_tokens(loaded, reference, files)
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        files,
        cfg.window,
        cfg.stride,
        cfg.batch_size,
        cfg.progress,
        None if reference is None else reference.model,
    )
    header = {"model": str(loaded.directory), "quant": cfg.quant, "adapter": cfg.adapter}
    return header | ({} if reference is None else {"reference": str(reference.directory)}) | result
