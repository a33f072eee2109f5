"""GGUF import, checked against transformers reading the same file (tiny GGUFs written here with gguf.GGUFWriter)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.gguf_import import read_gguf
from lmforge.model import Transformer, rope_frequencies
from tests.tiny import make_tiny_tokenizer

transformers = pytest.importorskip("transformers")

Q8 = gguf.GGMLQuantizationType.Q8_0
# A Qwen2.5-style template: system default, tools rendered with tojson, multi-turn.
TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are helpful.' }}"
    "{%- if tools %}{{- '\\n<tools>' }}{%- for t in tools %}{{- '\\n' }}{{- t | tojson }}{%- endfor %}"
    "{{- '\\n</tools>' }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if not (m.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEXTS = [
    "Hello, how are you today? I am fine, thank you.",
    "你好，今天过得怎么样？我很好，谢谢。",
    "混合 text: 机器学习 (machine learning) 让计算机 learn 规律 12345。",
    "罕见字：鹅鸭鸳鸯 and emoji 🤖 with   spaces\tand\nnew lines",
    "<|im_start|>user\n北京是中国的首都<|im_end|>\n<tool_call>{}</tool_call>",
]
ARCHS = {
    # arch: (pre-tokenizer, qkv bias, tied embeddings, rope theta)
    "llama": ("smollm", False, True, 1e5),
    "qwen2": ("qwen2", True, False, 1e6),
}


def vocab_for_gguf() -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and token types of the tiny test tokenizer, plus one user-defined token."""
    backend = make_tiny_tokenizer().backend
    model = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return [*tokens, "<tool_call>", "</tool_call>"], merges, [*types, 4, 4]


def write_gguf(
    path: Path,
    arch: str = "qwen2",
    tokenizer_model: str = "gpt2",
    extra_tensor: tuple[str, np.ndarray] | None = None,
    rope_freqs: np.ndarray | None = None,
    heads: int = 4,
    eos: str = "<|im_end|>",
    add_bos: bool = False,
) -> Path:
    pre, bias, tied, theta = ARCHS.get(arch, ARCHS["llama"])
    tokens, merges, types = vocab_for_gguf()
    vocab, hidden, inter, layers, kv_heads = len(tokens), 64, 96, 2, max(1, heads // 2)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index(eos))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], quantize: bool = False, scale: float = 0.2, base: float = 0.0) -> None:
        x = (base + scale * rng.standard_normal(shape)).astype(np.float32)  # torch order (out, in)
        if quantize:
            w.add_tensor(name, gguf.quants.quantize(x, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, x)

    add("token_embd.weight", (vocab, hidden), quantize=True, scale=1.0)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), base=1.0, scale=0.1)
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), quantize=i == 0)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), quantize=i == 0)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        if bias:
            add(f"blk.{i}.attn_q.bias", (heads * head_dim,), scale=0.5)
            add(f"blk.{i}.attn_k.bias", (kv_heads * head_dim,), scale=0.5)
            add(f"blk.{i}.attn_v.bias", (kv_heads * head_dim,), scale=0.5)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), quantize=True)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), base=1.0, scale=0.1)
        add(f"blk.{i}.ffn_gate.weight", (inter, hidden), quantize=True)
        add(f"blk.{i}.ffn_up.weight", (inter, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, inter), quantize=True)
    add("output_norm.weight", (hidden,), base=1.0, scale=0.1)
    if not tied:
        add("output.weight", (vocab, hidden), quantize=True)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, write_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param)


def our_model(path: Path) -> Transformer:
    cfg, state, _ = read_gguf(path, progress=False)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    return model.eval()


def test_logits_match_transformers(tiny_gguf: tuple[str, Path]) -> None:
    arch, path = tiny_gguf
    model = our_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.std() > 1.0  # weights large enough that a wrong q/k row order would show
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    _, bias, tied, theta = ARCHS[arch]
    assert (model.cfg.qkv_bias, model.cfg.tie_embeddings, model.cfg.rope_theta) == (bias, tied, theta)
    assert model.cfg.norm_eps == 1e-6  # stored as float32, read back as the intended value


def test_tokenizer_matches_transformers(tiny_gguf: tuple[str, Path]) -> None:
    _, path = tiny_gguf
    _, _, tok = read_gguf(path, progress=False)
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids) == text
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.eos_token_ids == [hf.convert_tokens_to_ids("<|im_end|>")]
    assert tok.bos_token == hf.bos_token and not tok.add_bos
    assert tok.vocab_size == len(hf)


def test_chat_template_matches_transformers(tiny_gguf: tuple[str, Path]) -> None:
    _, path = tiny_gguf
    _, _, tok = read_gguf(path, progress=False)
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = [
        {"role": "user", "content": "你好！"},
        {"role": "assistant", "content": "Hello! <b>How</b> can I help?"},
        {"role": "user", "content": "Tell me about 机器学习."},
    ]
    tools = [{"type": "function", "function": {"name": "search", "description": "Find <things> & 东西"}}]
    for kwargs in ({}, {"tools": tools}):
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        assert tok.render_chat(chat, **kwargs) == want
        assert tok.encode(want) == hf.apply_chat_template(chat, add_generation_prompt=True, **kwargs)["input_ids"]


def test_bos_and_end_of_turn_tokens(tmp_path: Path) -> None:
    # A base-model-style file: eos is <|endoftext|>, add_bos is on, and the chat template ends turns with <|im_end|>.
    path = write_gguf(tmp_path / "base.gguf", eos="<|endoftext|>", add_bos=True)
    cfg, _, tok = read_gguf(path, progress=False)
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.eos_tokens == ["<|endoftext|>", "<|im_end|>"]  # llama.cpp stops on both, and so do we
    assert cfg.eos_token_ids == [hf.convert_tokens_to_ids(t) for t in tok.eos_tokens]
    for text in TEXTS[:2]:
        assert tok.encode(text) == hf.encode(text) and tok.encode(text)[0] == tok.bos_token_id


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    def error(path: Path) -> str:
        with pytest.raises(LmforgeError) as e:
            read_gguf(path, progress=False)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return str(e.value)

    assert "no such file" in error(tmp_path / "absent.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a GGUF file" in error(tmp_path / "notes.txt")
    good = write_gguf(tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:2000])
    assert "truncated" in error(cut)
    cut.write_bytes(good.read_bytes()[:-100])
    assert "truncated (tensor output.weight runs past the end)" in error(cut)
    msg = error(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    assert "architecture 'gpt2' is not supported" in msg and "llama, qwen2" in msg
    f64 = ("blk.0.attn_v.bias", np.zeros(32, np.float64))
    msg = error(write_gguf(tmp_path / "f64.gguf", arch="llama", extra_tensor=f64))
    assert "tensor blk.0.attn_v.bias has type F64, which lmforge cannot dequantize" in msg
    msg = error(write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama"))
    assert "tokenizer model 'llama' is not supported" in msg and "byte-level BPE" in msg
    msg = error(write_gguf(tmp_path / "extra.gguf", extra_tensor=("blk.0.attn_gate.weight", np.zeros(4, np.float32))))
    assert "tensor 'blk.0.attn_gate.weight' is not part of a llama/qwen2 model" in msg


def test_llama3_rope_factors_become_rope_scaling(tmp_path: Path) -> None:
    # Llama 3.1's published settings; llama.cpp stores them only as per-frequency divisors (rope_freqs.weight).
    # The divisors as llama.cpp's convert_hf_to_gguf.py computes them (LlamaModel.generate_extra_tensors).
    want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    want["original_max_position_embeddings"] = 8192
    theta, head_dim = ARCHS["llama"][3], 64
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert sum(1 < f < 8 for f in factors) >= 2  # some frequencies fall in the interpolated band
    path = write_gguf(tmp_path / "l31.gguf", arch="llama", rope_freqs=np.array(factors), heads=1)
    cfg, _, _ = read_gguf(path, progress=False)
    got = dict(cfg.rope_scaling or {})
    assert got.pop("rope_type", None) == want.pop("rope_type")
    assert got == pytest.approx(want, rel=1e-3)
    # and the model's frequencies are the file's: base frequency / divisor
    np.testing.assert_allclose(rope_frequencies(cfg).numpy(), freqs / np.array(factors), rtol=1e-5)


@pytest.mark.slow
def test_real_gguf_first_token_logits_match_transformers(real_gguf: Path | None) -> None:
    if real_gguf is None:
        pytest.skip("no real GGUF file in the model cache")
    model = our_model(real_gguf)
    _, _, tok = read_gguf(real_gguf, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    for prompt in ("The capital of France is", "中国的首都是"):
        chat = [{"role": "user", "content": prompt}]
        text = tok.render_chat(chat)
        assert text == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0, -1]
            theirs = hf(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
        assert ours.argmax() == theirs.argmax()
