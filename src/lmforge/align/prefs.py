"""Preference data for reward models and DPO: records -> the token ids of one prompt and two replies to it.

Record shapes, recognised per record (JSON array or JSONL, as `lmforge sft` reads them; `system` optional):
- `prompt`, `chosen`, `rejected` as strings: the prompt is one user turn, the replies are assistant turns;
- the same keys with OpenAI message lists (TRL's conversational form): `prompt` the conversation so far,
  `chosen` / `rejected` one assistant message each (a list of one, or a plain string);
- no `prompt`: `chosen` and `rejected` are whole conversations, as message lists or as Anthropic-HH transcripts
  ("\\n\\nHuman: ...\\n\\nAssistant: ..."); their shared beginning is the prompt, and what follows it in each must
  be one assistant turn.
The prompt is rendered once with the model's chat template (generation prompt included) and tokenized once; each
reply is the text the template adds for that assistant turn (content and end-of-turn marker), tokenized on its
own and placed after the same prompt ids. So both replies see identical prompt tokens and BOS/EOS appear exactly
once. Bad records (a missing field, identical replies, an empty reply, a prompt that fills the context) stop with
file:line and the reason, or are skipped and counted (`--bad-records skip`). Replies longer than the room the
context leaves after the prompt are cut at the end and counted.
This module does not batch or run models (see pairs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file
from lmforge.tokenizer import Tokenizer
from lmforge.train.sft_data import BadRecord, parse_records, resolve_data, split_eval

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0  # how much better chosen is, when the data says (the reward model's --margin column)
    ref: tuple[float, float] | None = None  # the reference model's summed log-probabilities, once precomputed

    @property
    def tokens(self) -> int:
        """Tokens of the two sequences prompt+chosen and prompt+rejected, the usual count for speed figures."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class PrefStats:
    records: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0  # pairs with a reply cut to fit the context

    def summary(self) -> dict[str, int]:
        return {"records": self.records, "skipped": len(self.skipped), "truncated": self.truncated}


# --- records -> a prompt conversation and two reply texts ---------------------------------------------------------


def _message_list(value: Any, what: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise BadRecord(f"{what} must be a string or a list of {{role, content}} messages")
    messages = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BadRecord(f"{what}: every message needs a role (system, user or assistant) and a string content")
        messages.append({"role": role, "content": content})
    return messages


def hh_messages(transcript: str, what: str) -> list[dict[str, str]]:
    """An Anthropic-HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    parts = HH_TURN.split(text)  # ['', 'Human', q1, 'Assistant', a1, ...]
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(f"{what} is not a Human:/Assistant: transcript")
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in turns]


def _split_shared(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Whole conversations -> (shared prompt, chosen reply, rejected reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    rest_c, rest_r = chosen[n:], rejected[n:]
    if not rest_c or not rest_r:
        raise BadRecord("chosen and rejected are the same conversation")
    if len(rest_c) != 1 or len(rest_r) != 1 or rest_c[0]["role"] != "assistant" or rest_r[0]["role"] != "assistant":
        raise BadRecord("chosen and rejected must differ only in their last assistant turn")
    return chosen[:n], rest_c[0]["content"], rest_r[0]["content"]


def to_conversation(record: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply text, rejected reply text) of any supported record."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord(f"no {key!r} field; a preference record needs prompt (optional), chosen and rejected")
    if "prompt" in record:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _message_list(prompt, "prompt")
        replies = []
        for key in ("chosen", "rejected"):
            turns = _message_list(record[key], key)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise BadRecord(f"{key} must be one assistant reply")
            replies.append(turns[0]["content"])
        chosen, rejected = replies
    else:
        convs = []
        for key in ("chosen", "rejected"):
            value = record[key]
            convs.append(hh_messages(value, key) if isinstance(value, str) else _message_list(value, key))
        messages, chosen, rejected = _split_shared(*convs)
    if record.get("system"):
        if not isinstance(record["system"], str):
            raise BadRecord("system must be a string")
        messages = [{"role": "system", "content": record["system"]}, *messages]
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("the prompt must end with a user turn")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise BadRecord(f"the {key} reply is empty")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are identical")
    return messages, chosen, rejected


# --- tokens -------------------------------------------------------------------------------------------------------


def encode_prompt(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """The prompt rendered with the generation prompt, and its ids (BOS once, whether the template writes it or not)."""
    text = tok.render_chat(messages, add_generation_prompt=True)
    return text, tok.encode(text)


def encode_reply(tok: Tokenizer, messages: list[dict[str, str]], prompt_text: str, reply: str) -> list[int]:
    """The ids of what the template adds for this assistant turn after the prompt: content and end-of-turn marker
    (not the whitespace between turns); an EOS is appended when the template ends a turn without one."""
    full = tok.render_chat([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False).rstrip()
    if not full.startswith(prompt_text):
        raise BadRecord(
            "the chat template does not render the reply after the prompt it renders alone, so the reply's tokens "
            "cannot be separated; use a template whose earlier turns are a prefix of later ones"
        )
    ids = tok.backend.encode(full[len(prompt_text) :], add_special_tokens=False).ids
    if tok.eos_token_ids and (not ids or ids[-1] not in tok.eos_token_ids):
        ids.append(tok.eos_token_ids[0])
    return ids


def _margin(record: dict, column: str | None) -> float:
    if column is None:
        return 0.0
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"the margin column {column!r} must hold a number, got {value!r}")
    return float(value)


def encode_pair(tok: Tokenizer, record: Any, max_len: int, margin_column: str | None, stats: PrefStats) -> Pair:
    messages, chosen, rejected = to_conversation(record)
    prompt_text, prompt = encode_prompt(tok, messages)
    if len(prompt) >= max_len:
        raise BadRecord(
            f"the prompt is {len(prompt)} tokens, which leaves no room for a reply in --max-len {max_len}; "
            "shorten it or raise --max-len"
        )
    room = max_len - len(prompt)
    replies = [encode_reply(tok, messages, prompt_text, text) for text in (chosen, rejected)]
    if any(len(r) > room for r in replies):
        stats.truncated += 1
    return Pair(prompt, replies[0][:room], replies[1][:room], _margin(record, margin_column))


def load_pairs(
    paths: list[Path], tok: Tokenizer, max_len: int, bad_records: str = "stop", margin_column: str | None = None,
    stats: PrefStats | None = None,
) -> list[Pair]:
    stats = stats if stats is not None else PrefStats()
    pairs = list(parse_records(paths, lambda r: encode_pair(tok, r, max_len, margin_column, stats), bad_records,
                               stats.skipped))
    stats.records = len(pairs) + len(stats.skipped)
    if not pairs:
        raise LmforgeError(f"no usable preference pairs in {', '.join(map(str, paths))} (see the skipped records)")
    return pairs


class DataSettings(Protocol):
    data: list[str]
    eval_data: list[str]
    eval_fraction: float
    seed: int
    bad_records: str


def data_hashes(specs: list[str]) -> dict[str, str]:
    """SHA-256 of each data file (paths or builtin:NAME), what a run's identity records."""
    return {str(p): sha256_file(p) for p in map(resolve_data, specs)}


def load_split(
    cfg: DataSettings, tok: Tokenizer, max_len: int, margin_column: str | None = None
) -> tuple[list[Pair], list[Pair], PrefStats]:
    """(training pairs, held-out pairs, counts): --eval-data when given, else a seeded eval_fraction of --data."""
    stats = PrefStats()
    pairs = load_pairs([resolve_data(d) for d in cfg.data], tok, max_len, cfg.bad_records, margin_column, stats)
    if not cfg.eval_data:
        train, held = split_eval(pairs, cfg.eval_fraction, cfg.seed)
        return train, held, stats
    evals = [resolve_data(d) for d in cfg.eval_data]
    return pairs, load_pairs(evals, tok, max_len, cfg.bad_records, margin_column, PrefStats()), stats
