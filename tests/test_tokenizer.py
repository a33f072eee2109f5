"""Tokenizer: files transformers can open, chat templates rendered as transformers renders them, streaming."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import StreamDecoder, Tokenizer
from tests.tiny import CORPUS

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, how are you today? I am fine, thank you.",
    "你好，今天过得怎么样？我很好，谢谢。",
    "混合 text: 机器学习 (machine learning) 让计算机 learn 规律 2024。",
    "罕见字：鹅鸭鸳鸯 and emoji 🤖 with   spaces\tand\nnew lines",
    "<|im_start|>user\n北京是中国的首都<|im_end|>\n",
]
# Qwen2.5-style: a default system prompt, tools through tojson (whose escaping differs from Jinja's own filter),
# `message.role` attribute access, whitespace control, and one extra variable passed by the caller.
QWEN_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' }}
    {{- '\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}{{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""
CHAT = [
    {"role": "system", "content": "You answer in the user's language."},
    {"role": "user", "content": "你好！Who are you?"},
    {"role": "assistant", "content": "I am a <small> model & I'm fine."},
    {"role": "user", "content": "讲个笑话。"},
]
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Find <things> & 东西", "parameters": {}}}]


def with_template(tok: Tokenizer, template: str | None, **changes: object) -> Tokenizer:
    args = {"bos_token": tok.bos_token, "eos_tokens": tok.eos_tokens, "add_bos": tok.add_bos, **changes}
    return Tokenizer(tok.backend, template, **args)  # type: ignore[arg-type]


def test_saved_tokenizer_opens_in_transformers_and_encodes_identically(
    tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    tiny_tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert ids == hf.encode(text), text
        assert tiny_tokenizer.decode(ids) == hf.decode(ids) == text
        assert tiny_tokenizer.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in tiny_tokenizer.decode(tiny_tokenizer.encode(TEXTS[-1]), skip_special=True)
    assert hf.eos_token == "<|im_end|>"
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.eos_tokens, loaded.eos_token_ids) == (tiny_tokenizer.eos_tokens, tiny_tokenizer.eos_token_ids)
    assert (loaded.chat_template, loaded.bos_token, loaded.add_bos) == (tiny_tokenizer.chat_template, None, False)
    assert loaded.vocab_size == tiny_tokenizer.vocab_size == len(hf)


def test_bos_is_added_once_and_transformers_agrees(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    tok = with_template(tiny_tokenizer, None, bos_token="<|endoftext|>", add_bos=True)
    bos = tok.bos_token_id
    assert tok.encode("Hello")[0] == bos and tok.encode("Hello", add_bos=False)[0] != bos
    assert tok.encode("<|endoftext|>Hello") == tok.encode("Hello")  # a rendered template may already start with it
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert Tokenizer.load(tmp_path).add_bos


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_renders_as_transformers_does(
    tiny_tokenizer: Tokenizer, tmp_path: Path, tools: list | None
) -> None:
    tok = with_template(tiny_tokenizer, QWEN_LIKE)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for chat in (CHAT, CHAT[1:]):
        for extra in ({}, {"enable_thinking": False}):
            want = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True, **extra)
            assert tok.render_chat(chat, tools=tools, **extra) == want
    assert tok.render_chat(CHAT, add_generation_prompt=False) == hf.apply_chat_template(CHAT, tokenize=False)


def test_without_a_template_chat_is_chatml(tiny_tokenizer: Tokenizer) -> None:
    tok = with_template(tiny_tokenizer, None)
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]
    want = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat(chat) == want
    assert tok.encode(want)[0] == tok.backend.token_to_id("<|im_start|>")


def test_template_helpers_transformers_provides(tiny_tokenizer: Tokenizer) -> None:
    tok = with_template(tiny_tokenizer, "{{ strftime_now('%Y') }} {{ bos_token }}|{{ eos_token }} {{ greeting }}")
    year = str(datetime.date.today().year)
    assert tok.render_chat([], greeting="hi") == f"{year} |<|im_end|> hi"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the chat template tried an unsafe operation"),
        ("{{ messages.append({'role': 'x'}) }}", "the chat template tried an unsafe operation"),
        ("{% set ns = namespace(_hidden=1) %}", "the chat template tried an unsafe operation"),
        ("{{ raise_exception('System role not supported') }}", "refused this conversation: System role not supported"),
        ("{% for m in messages %}{{ m.content }", "the chat template has a syntax error at line 1"),
        ("{{ messages[0]['content'] + 1 }}", "the chat template failed: TypeError"),
    ],
)
def test_bad_templates_give_one_line_errors(tiny_tokenizer: Tokenizer, template: str, message: str) -> None:
    tok = with_template(tiny_tokenizer, template)
    with pytest.raises(LmforgeError) as e:
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stream_decoder_never_splits_a_character(tiny_tokenizer: Tokenizer) -> None:
    text = "鹅鸭鸳鸯在湖上游泳。Geese 🦢 swim; 机器学习很有趣！" * 3
    ids = tiny_tokenizer.encode(text)
    pieces_per_char = [tiny_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_per_char)  # some tokens really are parts of a character
    stream = tiny_tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # text was held back at least once
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text


def test_stream_decoder_decodes_a_small_window(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(" ".join(CORPUS) * 4)
    windows: list[int] = []

    def decode(window: list[int]) -> str:
        windows.append(len(window))
        return tiny_tokenizer.decode(window)

    stream = StreamDecoder(decode)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tiny_tokenizer.decode(ids)
    assert len(ids) > 200 and max(windows) <= 8


def test_stream_decoder_with_special_tokens_and_a_sentencepiece_style_decoder(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(TEXTS[-1] + TEXTS[1])
    stream = tiny_tokenizer.stream_decoder(skip_special=True)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tiny_tokenizer.decode(ids, skip_special=True)
    # Metaspace drops the space of a sequence's first token: decoding token by token would lose every space.
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    sp = Tokenizer(backend, None, None, [])
    ids = sp.encode("the quick brown fox predicts the next token")
    stream = sp.stream_decoder()
    assert (
        "".join(stream.push(i) for i in ids) + stream.flush()
        == sp.decode(ids)
        == "the quick brown fox predicts the next token"
    )


def test_load_errors_and_hf_variants(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="tokenizer.json: not a readable tokenizer"):
        Tokenizer.load(tmp_path)
    tiny_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(LmforgeError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.load(tmp_path)
    # Older and newer transformers spellings: AddedToken dicts, named templates, chat_template.jinja.
    cfg = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "default", "template": "A"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(tmp_path)
    assert (tok.eos_tokens, tok.chat_template) == (["<|im_end|>"], "A")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("B")
    assert Tokenizer.load(tmp_path).chat_template == "B"
