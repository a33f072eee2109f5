"""The tokenizer every lmforge stage uses: HF `tokenizers` for text <-> ids, plus chat templates and streaming.

What it does:
- encodes and decodes with a `tokenizers.Tokenizer` backend. Special tokens written in the text (`<|im_start|>`)
  are matched as special tokens, as transformers does when it encodes a rendered chat template; BOS is added by
  us (never by the backend's post-processor) when `add_bos` says so, and not twice if the text already starts
  with it;
- loads and saves the Hugging Face layout (`tokenizer.json` + `tokenizer_config.json`), so a saved directory
  opens in `transformers.AutoTokenizer` and encodes identically;
- renders chat templates. Templates come from model files, so they are untrusted code: they run in Jinja's
  `ImmutableSandboxedEnvironment`, with the same globals and filters transformers provides. A model without a
  template gets plain ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the most common format among open chat
  models and the one lmforge's own fine-tunes use; if the vocabulary lacks those tokens they are encoded as text;
- decodes incrementally (`StreamDecoder`), re-decoding only a small window per token.

What it does not do: train tokenizers, pad or batch, or know any model family.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

from lmforge import fileio
from lmforge.errors import LmforgeError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """A template called `raise_exception(message)`: the template's author refuses this conversation."""


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_tokens: list[str],
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_tokens = list(eos_tokens)
        self.add_bos = add_bos
        self.model_max_length: int | None = None
        self.bos_token_id = self._token_id(bos_token) if bos_token is not None else None
        self.eos_token_ids = [self._token_id(t) for t in self.eos_tokens]
        self._compiled: jinja2.Template | None = None

    def _token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise LmforgeError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- files ------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        directory = Path(directory)
        tok_file, cfg_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
        if not tok_file.is_file():
            raise LmforgeError(
                f"{directory}: no tokenizer.json; lmforge needs a Hugging Face fast tokenizer saved there"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise LmforgeError(f"{tok_file}: not a readable tokenizer ({_one_line(e)}); replace the file") from e
        cfg: dict[str, Any] = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LmforgeError(f"{cfg_file}: not valid JSON ({_one_line(e)}); replace the file") from e
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_tokens = cfg.get("lmforge_eos_tokens") or ([eos] if eos else [])
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # older Llama-style dirs add BOS in tokenizer.json's post-processor instead
            with_specials = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and with_specials[:1] == [backend.token_to_id(bos)]
        tok = cls(backend, _chat_template(cfg, directory), bos, eos_tokens, bool(add_bos))
        if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**9:
            tok.model_max_length = cfg["model_max_length"]
        return tok

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        # Our encode() adds BOS itself; transformers relies on the post-processor, so write one that agrees.
        if self.add_bos and self.bos_token is not None:
            bos = (self.bos_token, self.bos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos[0]}:0 $A:0", pair=f"{bos[0]}:0 $A:0 {bos[0]}:1 $B:1", special_tokens=[bos]
            )
        else:
            backend.post_processor = None
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            # transformers would otherwise strip spaces before punctuation on decode; we never do.
            "clean_up_tokenization_spaces": False,
        }
        if len(self.eos_tokens) > 1:  # HF keeps one eos here; the full stop list travels under our own key
            cfg["lmforge_eos_tokens"] = self.eos_tokens
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        fileio.write_text(directory / "tokenizer.json", backend.to_str())
        fileio.write_json(directory / "tokenizer_config.json", cfg)

    # --- text <-> ids -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(lambda ids: self.decode(ids, skip_special))

    # --- chat -------------------------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template or CHATML_TEMPLATE)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_tokens[0] if self.eos_tokens else "",
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        try:
            return self._compiled.render(**context)
        except _TemplateRaised as e:
            raise LmforgeError(f"the chat template refused this conversation: {_one_line(e)}") from e
        except jinja2.exceptions.SecurityError as e:
            raise LmforgeError(f"the chat template tried an unsafe operation and was stopped: {_one_line(e)}") from e
        except Exception as e:  # any other template bug (undefined names, type errors) is the model file's fault
            raise LmforgeError(f"the chat template failed: {type(e).__name__}: {_one_line(e)}") from e


class StreamDecoder:
    """Incremental detokenization (the prefix-window scheme of HF TGI and vLLM).

    Each push decodes only ids[prefix_offset:], a window starting a few tokens back, and returns what that
    adds beyond the text of ids[prefix_offset:read_offset]. Decoding a window rather than the one new token keeps
    decoders that look at neighbours right (sentencepiece drops the space of a sequence's first token; byte-level
    tokens may hold part of a character). Text ending in U+FFFD is an unfinished UTF-8 character: it is held back
    until a later token completes it, or until flush().
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix_offset :])
        if text.endswith("\ufffd") or len(text) <= len(self._prefix_text):
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as decode() gives it)."""
        text = self._decode(self._ids[self._prefix_offset :])
        new = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return new


# --- chat template sandbox -----------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; transformers replaces it with plain json.dumps, so do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    # transformers' hardening: a namespace must not take underscore attributes (a route towards CPython internals).
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by templates that mark assistant spans): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_Namespace,
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"the chat template has a syntax error at line {e.lineno}: {_one_line(e)}") from e


# --- helpers -------------------------------------------------------------------------------------------------


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token either as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(cfg: dict[str, Any], directory: Path) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (directory / "chat_template.jinja").is_file():  # transformers >= 4.49 writes this
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template
