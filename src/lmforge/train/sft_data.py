"""Instruction data for `lmforge sft`: records in three formats -> chat-templated token ids with a loss mask.

Formats, recognised per record by their keys (one file may mix them):
- Alpaca (JSON array or JSONL): `instruction`, optional `input`, `output`, optional `system` and `history`
  ([[user, assistant], ...] earlier turns);
- ShareGPT: `conversations` = [{"from": "human"|"gpt"|"system", "value": ...}, ...], optional `system`;
- OpenAI messages: `messages` = [{"role": "system"|"user"|"assistant", "content": ...}, ...].
The model's own chat template lays the conversation out (`Tokenizer.render_chat`); the loss covers exactly the
characters each assistant turn adds to the rendered text (its content and end-of-turn marker, not the whitespace
the template puts between turns), mapped to tokens through the tokenizer's character offsets.
General text for mixing (`.txt`, or JSONL with a `text` field) is cut into max-length pieces with the loss on
every token. `{{NAME}}` and `{{AUTHOR}}` in any string are replaced by the identity the user chose (the shipped
self-cognition set uses them). `builtin:NAME` names a data file shipped in `lmforge/datasets/`.
Batching is a pure function of the step number (see `StepBatches`), which is what makes resume exact.
This module does not tokenize pretraining corpora or download anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import IGNORE, Batch

T = TypeVar("T")
BUILTIN = {
    "self-cognition": "self_cognition.jsonl",
    "instructions": "instructions.jsonl",
    "preferences": "preferences.jsonl",  # prompt / chosen / rejected pairs for `lmforge rm train` and `dpo`
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


class BadRecord(Exception):
    """One record cannot be used; the caller adds file:line and decides whether to skip or stop."""


@dataclass
class Example:
    ids: list[int]
    labels: list[bool]  # True where the token is one the model should learn to produce


@dataclass
class DataStats:
    records: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0
    dropped: int = 0  # over max length with --overlong drop, or nothing left to learn after truncation
    general_pieces: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "records": self.records,
            "skipped": len(self.skipped),
            "truncated": self.truncated,
            "dropped": self.dropped,
            "general_pieces": self.general_pieces,
        }


def resolve_data(spec: str) -> Path:
    """A path, or builtin:NAME for a file shipped with lmforge."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN:
            raise LmforgeError(f"unknown built-in data set {name!r}; choose from {', '.join(BUILTIN)}")
        return Path(str(resources.files("lmforge") / "datasets" / BUILTIN[name]))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LmforgeError(f"{spec}: no such data file")
    return path


# --- reading records ----------------------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every record of a .json array or a .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")
    elif path.suffix == ".json":
        yield from _json_array(path, text)
    else:
        raise LmforgeError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; give .json or .jsonl files")


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on (json.loads would lose the lines)."""
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        raise LmforgeError(f"{path}: a .json data file must hold one array of records; use .jsonl for one per line")
    at += 1
    while True:
        at += len(text[at:]) - len(text[at:].lstrip(" \t\r\n,"))
        if at >= len(text) or text[at] == "]":
            return
        line = text.count("\n", 0, at) + 1
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        yield line, record


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: Any) -> list[dict[str, str]]:
    """Any supported record as OpenAI-style messages."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    system = [{"role": "system", "content": _text(record["system"], "system")}] if record.get("system") else []
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise BadRecord("messages must be a list")
        messages = [
            {"role": _text(m.get("role"), "role"), "content": _text(m.get("content"), "content")}
            for m in turns
            if isinstance(m, dict)
        ]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
            raise BadRecord("conversations must be a list of {from, value} objects")
        messages = []
        for m in turns:
            role = SHAREGPT_ROLES.get(m.get("from"))
            if role is None:
                raise BadRecord(f"unknown ShareGPT speaker {m.get('from')!r}; expected human, gpt or system")
            messages.append({"role": role, "content": _text(m.get("value"), "value")})
        messages = system + messages
    elif "instruction" in record or "output" in record:
        if "output" not in record:
            raise BadRecord("Alpaca record without output")
        prompt = _text(record.get("instruction", ""), "instruction")
        if record.get("input"):
            prompt = f"{prompt}\n\n{_text(record['input'], 'input')}" if prompt else _text(record["input"], "input")
        history = []
        for pair in record.get("history") or []:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadRecord("history must be a list of [user, assistant] pairs")
            history += [
                {"role": "user", "content": _text(pair[0], "history")},
                {"role": "assistant", "content": _text(pair[1], "history")},
            ]
        messages = (
            system
            + history
            + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "output")}]
        )
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(
            f"unknown record format (keys: {keys}); expected Alpaca (instruction/output), "
            "ShareGPT (conversations) or OpenAI (messages)"
        )
    _check_roles(messages)
    return messages


def _check_roles(messages: list[dict[str, str]]) -> None:
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRecord(f"unknown role {m['role']!r}; expected system, user or assistant")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no assistant reply to learn from")
    first = next(m for m in messages if m["role"] != "system")  # exists: there is an assistant turn
    if first["role"] != "user":
        raise BadRecord("the conversation starts with an assistant turn; it needs a user turn first")


def fill_identity(value: Any, identity: dict[str, str]) -> Any:
    """Replace {{NAME}}-style placeholders in every string of a record."""
    if isinstance(value, str):
        for key, text in identity.items():
            value = value.replace("{{" + key + "}}", text)
        return value
    if isinstance(value, list):
        return [fill_identity(v, identity) for v in value]
    if isinstance(value, dict):
        return {k: fill_identity(v, identity) for k, v in value.items()}
    return value


# --- tokenizing ---------------------------------------------------------------------------------------------------


def encode_chat(tok: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Token ids of the rendered conversation, labelled True on the characters each assistant turn adds."""
    text = tok.render_chat(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.render_chat(messages[:i], add_generation_prompt=True)
        through = tok.render_chat(messages[: i + 1], add_generation_prompt=False).rstrip()
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRecord(
                "the chat template does not render this conversation turn by turn, so assistant tokens "
                "cannot be located; use a template whose earlier turns are a prefix of later ones"
            )
        spans.append((len(before), len(through)))
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc.offsets]
    if tok.add_bos and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
        ids, labels = [tok.bos_token_id, *ids], [False, *labels]
    return Example(ids, labels)


def fit_length(example: Example, max_len: int, overlong: str, stats: DataStats) -> Example | None:
    """Keep, truncate (keep the head) or drop an example longer than max_len; count what happened."""
    if len(example.ids) <= max_len:
        return example
    if overlong == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    cut = Example(example.ids[:max_len], example.labels[:max_len])
    if not any(cut.labels[1:]):  # the first token is never a target
        stats.dropped += 1
        return None
    return cut


def load_examples(
    paths: list[Path],
    tok: Tokenizer,
    max_len: int,
    overlong: str,
    bad_records: str,
    identity: dict[str, str],
    stats: DataStats,
) -> list[Example]:
    def encode(record: Any) -> Example:
        return encode_chat(tok, to_messages(fill_identity(record, identity)))

    examples = []
    for example in parse_records(paths, encode, bad_records, stats.skipped):
        stats.records += 1
        fitted = fit_length(example, max_len, overlong, stats)
        if fitted is not None:
            examples.append(fitted)
    if not examples:
        raise LmforgeError(f"no usable examples in {', '.join(map(str, paths))} (see the skipped records above)")
    return examples


def parse_records(
    paths: list[Path], parse: Callable[[Any], T], bad_records: str, skipped: list[str]
) -> Iterator[T]:
    """parse(record) for every record of the files. A BadRecord stops with its file:line and reason
    (bad_records "stop") or is listed in `skipped` as "file:line: reason" ("skip"; the first few are printed)."""
    for path in paths:
        for line, record in read_records(path):
            try:
                yield parse(record)
            except BadRecord as e:
                where = f"{path}:{line}: {e}"
                if bad_records == "stop":
                    raise LmforgeError(f"{where}; fix the record or pass --bad-records skip") from None
                skipped.append(where)
    for where in skipped[:5]:
        print(f"lmforge: skipped {where}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"lmforge: skipped {len(skipped) - 5} more bad records", file=sys.stderr)


def general_pieces(paths: list[Path], tok: Tokenizer, max_len: int) -> list[Example]:
    """General text cut into max_len-token pieces, every token a target (for mixing against forgetting)."""
    pieces = []
    for path in paths:
        if path.suffix == ".jsonl":
            docs = [r.get("text", "") for _, r in read_records(path) if isinstance(r, dict)]
        else:
            docs = path.read_text(encoding="utf-8").split("\n\n")
        ids = []
        for doc in docs:
            if doc.strip():
                ids += tok.encode(doc.strip()) + tok.eos_token_ids[:1]
        chunks = [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
        pieces += [Example(c, [True] * len(c)) for c in chunks]
    pieces = [p for p in pieces if len(p.ids) > 1]
    if not pieces:
        raise LmforgeError(f"no text in the general data {', '.join(map(str, paths))}")
    return pieces


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most max_len tokens.

    Tokens of a packed row attend to the earlier examples in the row (no per-example mask, as in most packing
    implementations); the loss still covers only the targets each example had.
    """
    rows: list[Example] = []
    for ex in examples:
        if rows and len(rows[-1].ids) + len(ex.ids) <= max_len:
            rows[-1] = Example(rows[-1].ids + ex.ids, rows[-1].labels + ex.labels)
        else:
            rows.append(ex)
    return rows


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split: (train, eval); no eval split for fraction 0 or fewer than 4 examples."""
    n_eval = round(fraction * len(examples)) if len(examples) >= 4 else 0
    if fraction > 0 and len(examples) >= 4:
        n_eval = max(1, n_eval)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def mix(train: list[Example], general: list[Example], ratio: float, seed: int) -> list[Example]:
    """Add general pieces so that they make up `ratio` of the training examples (cycled when too few)."""
    want = round(ratio / (1 - ratio) * len(train))
    order = torch.randperm(len(general), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return train + [general[order[i % len(order)]] for i in range(want)]


# --- batches ------------------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded inputs (B, T-1) and next-token targets (B, T-1), IGNORE where no loss applies."""
    width = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width - 1), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        inputs[row, : n - 1] = torch.tensor(e.ids[:-1])
        wanted = [t if keep else IGNORE for t, keep in zip(e.ids[1:], e.labels[1:], strict=True)]
        targets[row, : n - 1] = torch.tensor(wanted)
    return {"input_ids": inputs, "targets": targets}


class StepBatches:
    """The micro-batches of any global step, computed from the step number alone.

    The example stream is epoch after epoch of seeded permutations; step s reads micro-batches s*accum ..
    (s+1)*accum - 1 of `batch_size` consecutive examples. No iterator state exists, so a resumed run reads exactly
    what the uninterrupted run would have read. `collate` turns a micro-batch's examples into tensors (any kind of
    example: instruction examples here, preference pairs in lmforge.align).
    """

    def __init__(
        self, examples: list[Any], batch_size: int, grad_accum: int, seed: int, collate: Callable[[list[Any]], Batch]
    ) -> None:
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.seed, self.collate = seed, collate
        self._orders: dict[int, list[int]] = {}

    def steps_per_epoch(self) -> int:
        return max(1, len(self.examples) // (self.batch_size * self.grad_accum))

    def _example(self, k: int) -> Any:
        epoch, i = divmod(k, len(self.examples))
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self.examples[self._orders[epoch][i]]

    def __call__(self, step: int) -> list[Batch]:
        first = step * self.grad_accum * self.batch_size
        return [
            self.collate([self._example(first + m * self.batch_size + j) for j in range(self.batch_size)])
            for m in range(self.grad_accum)
        ]


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
