"""`lmforge plan` against numbers computed by hand from the Chinchilla paper and the memory formula."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config import PRESETS
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.plan import PlanRequest, memory_per_device, n_params, plan


def test_chinchilla_compute_gives_70b_and_1_4t_tokens() -> None:
    # Chinchilla: 5.76e23 FLOPs -> 70B parameters, 1.4T tokens. sqrt(5.76e23 / 120) = 6.928e10, x20 = 1.386e12.
    result = plan(PlanRequest(compute=5.76e23))
    assert result["params"] == pytest.approx(6.928e10, rel=1e-3)
    assert result["tokens"] == pytest.approx(1.3856e12, rel=1e-3)
    assert result["flops"] == pytest.approx(5.76e23, rel=1e-9)


def test_gpu_hours_and_wall_time() -> None:
    # 1000 H100-hours at 40% of 989 TFLOP/s = 1.42416e21 FLOPs -> N = sqrt(1.42416e21 / 120) = 3.4450e9.
    result = plan(PlanRequest(gpu_hours=1000, gpu="h100", mfu=0.4))
    assert result["params"] == pytest.approx(3.4450e9, rel=1e-3)
    # The same MFU gives back the same hours: D / (0.4 * 989e12 / 6N) / 3600 = 1000.
    assert result["gpu_hours"] == pytest.approx(1000, rel=1e-6)
    # A measured 10,000 tokens/s on 8 devices: 20N tokens / 80,000 per s.
    timed = plan(PlanRequest(params=1e8, tok_s=10_000, devices=8))
    assert timed["tokens"] == 2e9 and timed["wall_hours"] == pytest.approx(2e9 / 80_000 / 3600)


def test_parameter_count_and_memory() -> None:
    for name in ("llama-tiny", "qwen2-tiny", "llama-17m"):
        assert n_params(PRESETS[name]) == sum(p.numel() for p in Transformer(PRESETS[name]).parameters())
    cfg = PRESETS["llama-17m"]
    # 16 bytes/param of AdamW state, /4 under FSDP; activations with checkpointing: 2*s*b*h*L*2 (fp32) + logits.
    acts = 2 * 256 * 8 * 384 * 6 * 2 + 256 * 8 * 8192 * 8
    assert memory_per_device(cfg, 8, 256, 4, "fsdp", checkpointing=True) == 16 * n_params(cfg) / 4 + acts
    assert memory_per_device(cfg, 8, 256, 4, "ddp", checkpointing=True) == 16 * n_params(cfg) + acts


def test_cli(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--params", "1.1e9", "--gpu", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == pytest.approx(2.2e10)
    assert main(["plan", "--compute", "1e20", "--preset", "llama-110m"]) == 0
    assert "memory/device" in capsys.readouterr().out
    with pytest.raises(LmforgeError, match="--gpu 'tpu'"):
        plan(PlanRequest(params=1e6, gpu="tpu"))
