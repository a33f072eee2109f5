"""ModelConfig: the one dataclass that describes every model family lmforge runs.

Family differences (Llama vs Qwen2) are fields, never name checks: Qwen2 is a Llama with `qkv_bias=True`,
a larger `rope_theta` and an untied head. This module also maps the config to and from Hugging Face's
`config.json`, because that file is how checkpoints describe themselves on disk.
It deliberately holds no weights, no tokenizer and no training settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 0  # 0 = hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # HF-style rope scaling dict ({"rope_type": "linear", "factor": 2.0} or llama3's keys); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # 0: a language model (lm_head over the vocabulary). 1: a reward model, a scalar `score` head in lm_head's place
    # (HF's *ForSequenceClassification, num_labels=1), read at the last real token of each sequence.
    num_labels: int = 0
    pad_token_id: int | None = None  # what HF's sequence classifier skips when it looks for the last real token

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise LmforgeError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Named presets for tests and from-scratch training. Real models get their config from their files.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2)
PRESETS: dict[str, ModelConfig] = {
    "llama-tiny": ModelConfig(**_TINY, max_seq_len=256, tie_embeddings=True),
    "qwen2-tiny": ModelConfig(**_TINY, max_seq_len=256, rope_theta=1e6, qkv_bias=True, norm_eps=1e-6),
    "llama-17m": ModelConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=6,
        max_seq_len=1024,
    ),
    # Pretraining sizes (`lmforge pretrain --preset`); names give the parameter count at the named vocabulary.
    "llama-5m": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
        max_seq_len=512, tie_embeddings=True,
    ),
    "llama-42m": ModelConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=8,
        max_seq_len=1024, tie_embeddings=True,
    ),
    "llama-110m": ModelConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=12,
        max_seq_len=2048, tie_embeddings=True,
    ),
    "llama-340m": ModelConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16, num_kv_heads=16,
        max_seq_len=2048, tie_embeddings=True,
    ),
    "llama-1.1b": ModelConfig(  # TinyLlama's shape
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
        max_seq_len=2048,
    ),
}


# --- Hugging Face config.json ---------------------------------------------------------------------------------


# HF's Llama applies `attention_bias` to the output projection too; Qwen2 biases q/k/v only. So a model with
# qkv bias is exported as Qwen2 and one without as Llama; which one is decided by the data, not by a name.
def hf_model_type(cfg: ModelConfig) -> str:
    return "qwen2" if cfg.qkv_bias else "llama"


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    model_type = hf_model_type(cfg)
    eos: int | list[int] | None = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
    family = "Qwen2" if model_type == "qwen2" else "Llama"
    d: dict[str, Any] = {
        "architectures": [f"{family}ForSequenceClassification" if cfg.num_labels else f"{family}ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    if cfg.num_labels:
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if model_type == "llama":
        d["attention_bias"] = False
        d["mlp_bias"] = False
    else:
        d["use_sliding_window"] = False
    return d


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise LmforgeError(
            f"{source}: model_type {model_type!r} is not supported; lmforge loads llama, qwen2 and mistral models"
        )
    if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias"):
        raise LmforgeError(f"{source}: only SwiGLU MLPs without bias are supported")
    if model_type == "llama" and d.get("attention_bias"):
        raise LmforgeError(f"{source}: Llama attention_bias (bias on the output projection) is not supported")
    eos = d.get("eos_token_id")
    classifier = any(a.endswith("ForSequenceClassification") for a in d.get("architectures") or [])
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    # Newer transformers nest rope settings under rope_parameters; older ones use rope_theta + rope_scaling.
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or 0,
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        num_labels=len(d.get("id2label") or {"0": ""}) if classifier else 0,
        pad_token_id=d.get("pad_token_id"),
    )
