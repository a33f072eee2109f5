"""Checkpoint save/load/convert, checked against transformers in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, trainers

from lmforge.checkpoint import convert, load_checkpoint, load_model, make_lineage, save_checkpoint
from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习让计算机从数据中学习。",
    "Hello world! 你好，世界！",
]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few English and Chinese sentences, with ChatML specials."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES * 4, trainer)
    return Tokenizer(backend, None, "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"])


def tiny_model(preset: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(PRESETS[preset])
    model.init_weights()
    # Non-trivial norms, so a norm loaded into the wrong place would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_round_trip_and_transformers_reads_ours(tmp_path: Path, tok: Tokenizer, preset: str) -> None:
    model = tiny_model(preset)
    save_checkpoint(tmp_path / "ck", model.cfg, model.state_dict(), tok, make_lineage("test"), {"temperature": 0.7})
    loaded, loaded_tok = load_checkpoint(tmp_path / "ck")
    x = ids(model.cfg)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
        torch.testing.assert_close(hf(x).logits, want, rtol=0, atol=1e-5)
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == model.cfg.tie_embeddings
    text = "Hello 世界"
    assert loaded_tok.encode(text) == tok.encode(text)
    assert loaded_tok.eos_token_ids == tok.eos_token_ids
    generation = json.loads((tmp_path / "ck" / "generation_config.json").read_text())
    assert generation["temperature"] == 0.7 and generation["do_sample"] is True


def test_tied_head_is_not_stored(tmp_path: Path) -> None:
    from safetensors import safe_open

    for preset in ("llama-tiny", "qwen2-tiny"):
        model = tiny_model(preset)
        save_checkpoint(tmp_path / preset, model.cfg, model.state_dict(), None, make_lineage("test"))
        with safe_open(str(tmp_path / preset / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert ("lm_head.weight" in keys) != model.cfg.tie_embeddings
        assert "model.embed_tokens.weight" in keys and all(k.startswith(("model.", "lm_head.")) for k in keys)


def hf_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF initialises biases and norms to constants; make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True])
def test_we_read_transformers_checkpoints(tmp_path: Path, tok: Tokenizer, kind: str, sharded: bool) -> None:
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if sharded else {}))
    tok.save(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    model, _ = load_checkpoint(tmp_path)
    x = ids(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-5)
    assert model.cfg.qkv_bias == (kind == "qwen2")
    assert model.cfg.tie_embeddings == (kind == "llama")


def test_lineage_fields_and_convert_keeps_parent(tmp_path: Path, tok: Tokenizer) -> None:
    model = tiny_model("qwen2-tiny")
    first = make_lineage("/data/model.gguf", "ab" * 32, kind="gguf")
    save_checkpoint(tmp_path / "a", model.cfg, model.state_dict(), tok, first)
    lineage = json.loads((tmp_path / "a" / "lineage.json").read_text())
    for field in ("source", "source_sha256", "command", "lmforge_version", "git_commit", "created_utc", "parent"):
        assert field in lineage
    assert lineage["source_sha256"] == "ab" * 32 and lineage["created_utc"].endswith("+00:00")

    convert(tmp_path / "a", tmp_path / "b", progress=False)
    second = json.loads((tmp_path / "b" / "lineage.json").read_text())
    assert second["parent"] == lineage
    assert second["source"] == str((tmp_path / "a").resolve())
    assert len(second["source_files"]["model.safetensors"]) == 64
    x = ids(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "b")(x), model(x), rtol=0, atol=0)


def test_load_with_dtype(tmp_path: Path) -> None:
    model = tiny_model("llama-tiny")
    save_checkpoint(tmp_path, model.cfg, model.state_dict(), None, make_lineage("test"))
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rope_cos.dtype == torch.bfloat16
    assert half(ids(model.cfg)).dtype == torch.bfloat16


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    hf_model("llama").config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(LmforgeError, match=r"pytorch_model\.bin.*never unpickles"):
        load_model(tmp_path)


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    model = tiny_model("llama-tiny")
    save_checkpoint(tmp_path, model.cfg, model.state_dict(), None, make_lineage("test"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LmforgeError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        load_model(tmp_path)


def test_missing_config_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(LmforgeError, match="not a directory"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("layers.1.mlp.up_proj.weight"), r"model\.layers\.1\.mlp\.up_proj\.weight is missing"),
        (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected tensor model\.extra"),
        (lambda sd: sd.update({"norm.weight": torch.ones(7)}), r"model\.norm\.weight has shape \(7,\).*\(64,\)"),
    ],
)
def test_mismatched_tensors_are_named(tmp_path: Path, edit, message: str) -> None:
    model = tiny_model("qwen2-tiny")
    state = dict(model.state_dict())
    edit(state)
    save_checkpoint(tmp_path, model.cfg, state, None, make_lineage("test"))
    with pytest.raises(LmforgeError, match=message):
        load_model(tmp_path)


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    class Exploding:
        def save(self, directory: Path) -> None:
            raise KeyboardInterrupt  # as if killed half-way through the directory

    model = tiny_model("llama-tiny")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", model.cfg, model.state_dict(), Exploding(), make_lineage("test"))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_checkpoint(tmp_path: Path) -> None:
    class Exploding:
        def save(self, directory: Path) -> None:
            raise RuntimeError("boom")

    old, new = tiny_model("llama-tiny", seed=0), tiny_model("llama-tiny", seed=1)
    save_checkpoint(tmp_path / "ck", old.cfg, old.state_dict(), None, make_lineage("old"))
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ck", new.cfg, new.state_dict(), Exploding(), make_lineage("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    x = ids(old.cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ck")(x), old(x), rtol=0, atol=0)


def test_save_refuses_to_replace_a_non_checkpoint_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    model = tiny_model("llama-tiny")
    with pytest.raises(LmforgeError, match="not a checkpoint"):
        save_checkpoint(tmp_path, model.cfg, model.state_dict(), None, make_lineage("test"))
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_loaded_weights_are_copy_on_write(tmp_path: Path) -> None:
    model = tiny_model("llama-tiny")
    save_checkpoint(tmp_path, model.cfg, model.state_dict(), None, make_lineage("test"))
    before = (tmp_path / "model.safetensors").read_bytes()
    loaded = load_model(tmp_path)
    with torch.no_grad():  # training updates weights in place; the file must not change
        for p in loaded.parameters():
            p.add_(1.0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
