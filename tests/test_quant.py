"""INT8/INT4 quantization: the packed format against GGUF's own blocks, kernels against float math, whole models
against their float selves, checkpoints round trip, and bad input refused with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import kernels
from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.quant import QuantLinear, QuantScheme, pack, quantize_, scheme_of
from lmforge.quant.quantize import QuantizeConfig, main
from lmforge.sampling import SamplingParams
from tests.tiny import CORPUS, make_tiny_model, make_tiny_tokenizer

needs_native = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the native kernels are not built")


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _min_max(w: torch.Tensor, bits: int, group: int) -> pack.Packed:
    """Round-to-nearest on each group's full range (INT4 without the grid search)."""
    if bits == 8:
        return pack.quantize_rtn(w, 8, group)
    d, m = pack.int4_grid(w, group)
    return pack.Packed(pack.pack_codes(pack.round_to_grid(w, d, m, group), 4), d, m)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_error_is_within_half_a_step(bits: int, group: int) -> None:
    w = _weight()
    p = _min_max(w, bits, group)
    back = pack.dequantize(p, bits, group)
    step = p.scales.float().repeat_interleave(group, dim=1)
    # Half a quantization step, plus the fp16 rounding of the scale and offset themselves.
    assert ((back - w).abs() <= step / 2 + 2e-3 * w.abs().amax()).all()
    assert torch.equal(
        pack.unpack_codes(p.qweight, bits),
        pack.unpack_codes(pack.pack_codes(pack.unpack_codes(p.qweight, bits), bits), bits),
    )


@pytest.mark.parametrize("group", [32, 128])
def test_searched_int4_grid_beats_the_full_range_and_keeps_grid_weights_exact(group: int) -> None:
    w = _weight(64, 256, seed=1)
    w[::7, ::11] *= 8  # outliers: a few weights stretch their group's range, coarsening the step for the rest
    per_group = lambda p: ((pack.dequantize(p, 4, group) - w) ** 2).reshape(64, -1, group).sum(-1)  # noqa: E731
    full, searched = per_group(_min_max(w, 4, group)), per_group(pack.quantize_rtn(w, 4, group))
    assert (searched <= full * 1.001 + 1e-12).all()  # never worse in any group (fp16 rounding aside)
    assert searched.sum() < 0.9 * full.sum()  # and clearly better overall
    # Weights already on a 16-level grid (a GGUF Q4_1 model's) come back exactly, as with the full range.
    codes = torch.randint(0, 16, (8, group), generator=torch.Generator().manual_seed(2))
    codes[:, 0], codes[:, 1] = 0, 15
    d, m = torch.tensor(0.0125).half().float(), torch.tensor(-0.1).half().float()  # fp16 grids, as GGUF stores
    on_grid = codes.float() * d + m
    torch.testing.assert_close(pack.dequantize(pack.quantize_rtn(on_grid, 4, group), 4, group), on_grid)


@pytest.mark.parametrize(("bits", "gguf_type"), [(4, "Q4_1"), (8, "Q8_0")])
def test_layout_is_ggufs_block_layout(bits: int, gguf_type: str) -> None:
    """GGUF's own quantizer's blocks, re-read as our tensors, dequantize to what gguf says they mean."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[gguf_type]
    w = _weight(8, 128).numpy()
    blocks = quants.quantize(w, qtype).reshape(8, 4, -1)  # (rows, blocks of 32, bytes per block)
    scales = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(8, 4))
    if bits == 4:
        mins = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(8, 4))
        qweight = torch.from_numpy(blocks[:, :, 4:].reshape(8, -1).copy())
    else:
        mins = None
        qweight = torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8).reshape(8, -1))
    ours = pack.dequantize(pack.Packed(qweight, scales, mins), bits, 32)
    theirs = torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_kernel_matches_float_product_of_the_same_weights(bits: int, rows: int) -> None:
    w, bias = _weight(), torch.randn(96)
    p = pack.quantize_rtn(w, bits, 64)
    layer = QuantLinear.from_packed(p, bias, bits, 64)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        fast = layer(x)  # native kernel: activations rounded to int8 per 32-block, as llama.cpp does
        turns = layer(x.repeat(3, 1))[:rows]  # a batched decode step: the kernel, 8 rows a call
        many = layer(x.repeat(40, 1))[:rows]  # prefill-sized: expanded weights, float GEMM
    exact = x @ pack.dequantize(p, bits, 64).T + bias
    torch.testing.assert_close(many, exact, rtol=1e-5, atol=1e-5)
    assert (fast - exact).norm() / exact.norm() < 0.01
    torch.testing.assert_close(turns, fast, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.dequantize(p.qweight, p.scales, p.mins, bits, 64), pack.dequantize(p, bits, 64))


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_a_row_decodes_to_the_same_bits_alone_or_in_a_batch(bits: int, group: int) -> None:
    """What the server's batch invariance rests on: a quantized model's greedy reply must not depend on load."""
    w, bias = _weight(n=40, k=896), torch.randn(40)
    layer = QuantLinear.from_packed(pack.quantize_rtn(w, bits, group), bias, bits, group)
    x = torch.randn(kernels.MAX_ROWS, 896)
    with torch.no_grad():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for rows in range(2, len(x) + 1):
            assert torch.equal(layer(x[:rows]), alone[:rows]), f"{rows} rows"


def test_backward_reaches_the_input_only() -> None:
    w = _weight()
    layer = QuantLinear.from_packed(pack.quantize_rtn(w, 4, 32), None, 4, 32)
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, pack.dequantize(layer.packed, 4, 32).sum(0).expand(2, -1))
    assert list(layer.parameters()) == []


def _greedy(model: torch.nn.Module, tok, prompt: str, n: int = 12) -> list[int]:  # noqa: ANN001
    engine = Engine(model, tok)
    return engine.generate([tok.encode(prompt)], SamplingParams(max_new_tokens=n, temperature=0))[0].token_ids


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    return torch.nn.functional.cross_entropy(logits, ids[1:]).item()


def _trained_tiny(preset: str, tok) -> torch.nn.Module:  # noqa: ANN001
    """A tiny model that has memorised the test corpus, so its greedy choices are decided, not near-ties of noise."""
    model = make_tiny_model(preset)
    model.init_weights(std=0.02)
    model.train()
    text = torch.tensor(tok.encode(" ".join(CORPUS)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(text[None, :-1])[0], text[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_int8_model_decodes_like_float_and_int4_stays_close(preset: str) -> None:
    tok = make_tiny_tokenizer()
    trained = _trained_tiny(preset, tok)
    state = {k: v.clone() for k, v in trained.state_dict().items()}

    def fresh() -> torch.nn.Module:
        model = make_tiny_model(preset)
        model.load_state_dict(state)
        return model.eval()

    prompt = "Hello, how"
    float_tokens = _greedy(fresh(), tok, prompt, n=16)
    with torch.no_grad():  # the premise: every greedy choice wins by a clear margin, so rounding cannot flip it
        logits = fresh()(torch.tensor([tok.encode(prompt) + float_tokens]))[0, -len(float_tokens) - 1 : -1]
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2
    ids = torch.tensor(tok.encode(" ".join(CORPUS)))  # memorised: rounding must not make the model forget it
    float_loss = _loss(fresh(), ids)
    int8 = quantize_(fresh(), QuantScheme(bits=8), progress=False)
    int4 = quantize_(fresh(), QuantScheme(bits=4), progress=False)
    assert _greedy(int8, tok, prompt, n=16) == float_tokens
    # Perplexity ratios exp(loss difference): INT8 within 0.5 %, INT4 within 3 % (real models: test_real_models).
    assert float_loss < 0.05
    assert abs(math.exp(_loss(int8, ids) - float_loss) - 1) < 0.005
    assert abs(math.exp(_loss(int4, ids) - float_loss) - 1) < 0.03
    mixed = quantize_(fresh(), QuantScheme.parse("int4:mixed"), progress=False)
    assert abs(math.exp(_loss(mixed, ids) - float_loss) - 1) < 0.03
    _greedy(mixed, tok, prompt, n=2)  # the engine swaps in its decode blocks: INT8 q|k|v, INT4 o and gate|up, ...
    if kernels.library() is not None:  # ... and each block still runs as one native call
        assert all(block._planned for block in mixed.layers)


def _save_tiny(directory: Path, preset: str) -> Path:
    model, tok = make_tiny_model(preset), make_tiny_tokenizer()
    save_checkpoint(directory, model.cfg, model.state_dict(), tok, make_lineage("test"))
    return directory


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_quantized_checkpoint_round_trips(tmp_path: Path, preset: str) -> None:
    src = _save_tiny(tmp_path / "float", preset)
    result = main(QuantizeConfig(out=str(tmp_path / "q"), model=str(src), bits=4, progress=False))
    assert result["quantized_bytes"] < result["float_bytes"] / 3
    loaded, tok = load_checkpoint(tmp_path / "q")
    assert scheme_of(loaded) == QuantScheme(bits=4)
    fresh = quantize_(load_checkpoint(src)[0], QuantScheme(bits=4), progress=False)
    ids = torch.tensor([tok.encode("你好 hello world")])
    with torch.no_grad():
        assert torch.equal(loaded(ids), fresh(ids))
    assert _greedy(loaded, tok, "hello") == _greedy(fresh, tok, "hello")
    assert "lm_head.qweight" in (tmp_path / "q" / "model.safetensors").read_bytes()[:20000].decode("latin-1")


def test_mixed_recipe_keeps_qkv_and_down_projections_at_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.loader import open_model

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    src = _save_tiny(tmp_path / "float", "qwen2-tiny")
    scheme = QuantScheme.parse("int4:mixed")
    assert scheme.label == "int4:mixed"
    assert QuantScheme.from_config(json.loads(json.dumps(scheme.to_config())), "config.json") == scheme
    model = open_model(str(src), "int4:mixed").model
    bits = {name: m.bits for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert bits["layers.0.self_attn.v_proj"] == bits["layers.1.mlp.down_proj"] == bits["lm_head"] == 8
    assert bits["layers.0.self_attn.q_proj"] == bits["layers.0.self_attn.k_proj"] == 8  # q|k|v stack in one kernel
    assert bits["layers.0.self_attn.o_proj"] == bits["layers.1.mlp.up_proj"] == bits["layers.1.mlp.gate_proj"] == 4
    assert scheme_of(model) == scheme
    plain = open_model(str(src), "int4").model  # a separate cached checkpoint, not the mixed one reused
    assert plain.layers[0].self_attn.v_proj.bits == 4
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS) * 4, encoding="utf-8")
    out = tmp_path / "gptq"
    main(QuantizeConfig(out=str(out), model=str(src), method="gptq", calib=str(calib), progress=False,
                        int8_layers=scheme.int8_layers))
    gptq, _ = load_checkpoint(out)
    assert gptq.layers[1].mlp.down_proj.bits == 8 and gptq.layers[1].mlp.gate_proj.bits == 4
    with pytest.raises(LmforgeError, match="needs bits 4"):
        QuantScheme.parse("int8:mixed")


def test_bad_input_is_refused_and_nothing_written(tmp_path: Path) -> None:
    src = _save_tiny(tmp_path / "float", "llama-tiny")
    with pytest.raises(LmforgeError, match="not a multiple of the group size 64"):
        main(QuantizeConfig(out=str(tmp_path / "g64"), model=str(src), group_size=64, progress=False))
    assert not (tmp_path / "g64").exists()
    main(QuantizeConfig(out=str(tmp_path / "q"), model=str(src), progress=False))
    with pytest.raises(LmforgeError, match="already quantized"):
        main(QuantizeConfig(out=str(tmp_path / "qq"), model=str(tmp_path / "q"), progress=False))
    assert not (tmp_path / "qq").exists()
    for text in ("int3", "int4:x", "fp8"):
        with pytest.raises(LmforgeError, match="--quant"):
            QuantScheme.parse(text)
    with pytest.raises(LmforgeError, match="unsupported bit width 2"):
        QuantScheme(bits=2)
    assert QuantScheme.parse("int4:g128") == QuantScheme(bits=4, group_size=128)


@needs_native
def test_quantized_layer_compiles_to_the_same_result() -> None:
    layer = QuantLinear.from_packed(pack.quantize_rtn(_weight(), 4, 32), torch.randn(96), 4, 32)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.slow
def test_gguf_blocks_load_without_a_float_round_trip(tmp_path: Path, real_gguf: Path, smollm2_checkpoint: Path) -> None:
    """SmolLM2's GGUF stores Q4_1 layers and a Q8_0 tied embedding: kept as they are, they give the same float
    weights as the dequantizing import, so the expanded (prefill) path gives bit-identical logits."""
    from lmforge.checkpoint import convert

    out = convert(real_gguf, tmp_path / "kept", progress=False, keep_quant=True)
    kept, tok = load_checkpoint(out)
    assert scheme_of(kept) == QuantScheme(bits=4, group_size=32, head_bits=8, embed_bits=None, method="gguf")
    float_model, _ = load_checkpoint(smollm2_checkpoint)
    ids = torch.tensor([tok.encode("The capital of France is Paris. 北京是中国的首都。") * 4])  # > KERNEL_ROWS
    with torch.no_grad():
        assert torch.equal(kept(ids), float_model(ids))
    assert sum(p.stat().st_size for p in out.iterdir()) < 0.2 * sum(
        p.stat().st_size for p in smollm2_checkpoint.iterdir()
    )


@pytest.mark.slow
def test_gguf_with_unsupported_blocks_is_refused(tmp_path: Path, qwen_checkpoint: Path) -> None:
    from lmforge.checkpoint import convert

    gguf_file = next(qwen_checkpoint.parent.glob("*.gguf"))
    with pytest.raises(LmforgeError, match="Q4_K, Q5_0, Q6_K, Q8_0; lmforge's kernels read Q4_0, Q4_1 or Q8_0"):
        convert(gguf_file, tmp_path / "kept", progress=False, keep_quant=True)
    assert not (tmp_path / "kept").exists()


def test_quant_flag_quantizes_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.loader import open_model

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    src = _save_tiny(tmp_path / "float", "qwen2-tiny")
    first = open_model(str(src), "int4")
    [kept] = (tmp_path / "cache" / "quantized").iterdir()
    stamp = (kept / "model.safetensors").stat().st_mtime_ns
    again = open_model(str(src), "int4")
    assert (kept / "model.safetensors").stat().st_mtime_ns == stamp  # made once, then reused
    assert scheme_of(again.model) == QuantScheme(bits=4)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(first.model(ids), again.model(ids))
    with pytest.raises(LmforgeError, match="already quantized"):
        open_model(str(kept), "int8")
    monkeypatch.setattr(pack, "ROUNDING_VERSION", pack.ROUNDING_VERSION + 1)  # rounding code changed since
    open_model(str(src), "int4")
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 2  # made again, not the stale copy reused


def test_gptq_through_the_quantize_stage(tmp_path: Path) -> None:
    src = _save_tiny(tmp_path / "float", "qwen2-tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS) * 4, encoding="utf-8")
    main(QuantizeConfig(out=str(tmp_path / "q"), model=str(src), method="gptq", calib=str(calib), progress=False))
    model, _ = load_checkpoint(tmp_path / "q")
    assert scheme_of(model).method == "gptq"
    (tmp_path / "bad.txt").write_bytes("你好".encode("gbk"))
    with pytest.raises(LmforgeError, match="not UTF-8"):
        main(QuantizeConfig(out=str(tmp_path / "g"), model=str(src), method="gptq", calib=str(tmp_path / "bad.txt")))
    with pytest.raises(LmforgeError, match="--calib is the calibration text of --method gptq"):
        main(QuantizeConfig(out=str(tmp_path / "g"), model=str(src), calib=str(calib)))
    assert not (tmp_path / "g").exists()


def test_quant_flag_with_gptq_calibrates_once_and_checks_the_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.loader import open_model

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    src = _save_tiny(tmp_path / "float", "qwen2-tiny")
    assert scheme_of(open_model(str(src), "int4:gptq").model) == QuantScheme(bits=4, method="gptq")
    [kept] = (tmp_path / "cache" / "quantized").iterdir()
    assert "-int4-gptq-" in kept.name  # apart from an RTN copy of the same model
    assert scheme_of(open_model(str(kept), "int4").model).method == "gptq"  # any INT4 g32 rounding will do
    rtn = tmp_path / "rtn"
    main(QuantizeConfig(out=str(rtn), model=str(src), progress=False))
    with pytest.raises(LmforgeError, match=r"already quantized \(int4\)"):
        open_model(str(rtn), "int4:gptq")
