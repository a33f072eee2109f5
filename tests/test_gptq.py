"""GPTQ (quant/gptq.py): the algorithm against round-to-nearest, the model pass, the format, the calibration text."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant import QuantLinear, QuantScheme, pack, quantize_
from lmforge.quant.gptq import SHARED_INPUTS, calibration_ids, gptq_pack, gptq_quantize
from lmforge.quant.layers import BLOCK_LINEARS
from lmforge.tokenizer import Tokenizer

DATASETS = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "datasets"
HELDOUT = ("heldout_en.txt", "heldout_zh.txt")  # the evaluation texts, never used for calibration


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The shapes here are small: on the shared 2-core CI machine a second OpenMP thread made them ~7x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shared_inputs_cover_the_block_linears_once() -> None:
    assert sorted(name for names in SHARED_INPUTS for name in names) == sorted(BLOCK_LINEARS)


# --- the algorithm on one weight ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("hessian", ["zero", "isotropic"])
def test_without_input_correlations_gptq_is_round_to_nearest(bits: int, hessian: str) -> None:
    # With H diagonal-constant (or no calibration at all) no column can compensate another: GPTQ must give
    # exactly pack.quantize_rtn's codes and grids.
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    h = torch.zeros(128, 128) if hessian == "zero" else 3.0 * torch.eye(128)
    got, want = gptq_quantize(w, h, bits, 32), pack.quantize_rtn(w, bits, 32)
    assert torch.equal(got.qweight, want.qweight)
    assert torch.equal(got.scales, want.scales)
    assert (got.mins is None) == (want.mins is None) and (got.mins is None or torch.equal(got.mins, want.mins))


def test_dead_columns_keep_their_weight_rounded_to_nearest() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(512, 64)
    x[:, [5, 40]] = 0  # inputs that never fire on the calibration text
    p = gptq_quantize(w, 2 * x.T @ x / len(x), 4, 32)
    codes = pack.unpack_codes(p.qweight, 4)
    for c in (5, 40):
        g = slice(c // 32, c // 32 + 1)
        assert torch.equal(codes[:, c : c + 1], pack.round_to_grid(w[:, c : c + 1], p.scales[:, g], p.mins[:, g], 1))
    assert torch.isfinite(pack.dequantize(p, 4, 32)).all()


# --- a real layer with real activations -------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the capturing hook: the rest of the block is not needed."""


def _linear_inputs(model: Transformer, layer: str, ids: list[list[int]]) -> torch.Tensor:
    """The inputs (rows, K) of `layer` ("layers.1.self_attn.q_proj") in the float model, running only the blocks
    before its own, so an early layer of a big model is cheap."""
    block = int(layer.split(".")[1])
    seen = []

    def capture(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append(args[0][0])
        raise _Captured

    hook = model.get_submodule(layer).register_forward_hook(capture)
    with torch.inference_mode():
        for s in ids:
            x = model.embed_tokens(torch.tensor([s]))  # (1, T, hidden)
            rope = model.rope_cos[: len(s)], model.rope_sin[: len(s)]
            for b in model.layers[:block]:
                x = b(x, *rope, None, None)
            with contextlib.suppress(_Captured):
                model.layers[block](x, *rope, None, None)
    hook.remove()
    return torch.cat(seen)  # (rows, K)


@pytest.fixture(scope="module")
def qwen_layer(qwen_checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real layer's weight (N, K), its inputs on the calibration text and on the held-out texts (rows, K).

    Qwen2.5-Coder-0.5B's layer 1 q_proj (896 x 896): stored as Q5_0 in the catalog GGUF, so INT4 loses something,
    unlike SmolLM2, whose Q4_1 weights already sit on the INT4 g32 grid.
    """
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(qwen_checkpoint)
    layer = "layers.1.self_attn.q_proj"
    calib = _linear_inputs(model, layer, calibration_ids(tokenizer, n_samples=6, seq_len=256))
    heldout = [_linear_inputs(model, layer, calibration_ids(tokenizer, DATASETS / f, 2, 256)) for f in HELDOUT]
    return model.get_submodule(layer).weight.detach(), calib, torch.cat(heldout)


@pytest.mark.slow
@pytest.mark.parametrize(("group", "most"), [(32, 0.85), (128, 0.85)])
def test_gptq_lowers_reconstruction_error_on_a_real_layer(
    qwen_layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor], group: int, most: float
) -> None:
    # Calibrated on the shipped calibration text, measured on the held-out texts, which GPTQ never saw.
    w, calib, heldout = qwen_layer
    ref = heldout @ w.T
    rtn = (heldout @ pack.dequantize(pack.quantize_rtn(w, 4, group), 4, group).T - ref).norm()
    gptq_w = pack.dequantize(gptq_quantize(w, 2 * calib.T @ calib / len(calib), 4, group), 4, group)
    gptq = (heldout @ gptq_w.T - ref).norm()
    print(f"g{group}: held-out ||XW^T - XŴ^T||  RTN {rtn:.2f}  GPTQ {gptq:.2f}  ratio {gptq / rtn:.3f}")
    assert gptq < most * rtn, f"g{group}: GPTQ error {gptq:.3f} vs RTN {rtn:.3f}"


# --- the model pass and the format -------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["int8", "int4", "int4:mixed"])
def test_packed_weights_load_into_quantlinear_and_beat_rtn(
    tiny_model: Transformer, tiny_tokenizer: Tokenizer, quant: str
) -> None:
    ids = calibration_ids(tiny_tokenizer, n_samples=4, seq_len=64)
    scheme = dataclasses.replace(QuantScheme.parse(quant), head_bits=None)  # a float head: only the blocks differ
    before = copy.deepcopy(tiny_model.state_dict())
    packed = gptq_pack(tiny_model, scheme, ids, progress=False)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())  # the float model is untouched
    assert sorted(packed) == sorted(f"layers.{i}.{n}" for i in range(len(tiny_model.layers)) for n in BLOCK_LINEARS)

    gptq = quantize_(copy.deepcopy(tiny_model), scheme, packed, progress=False)
    for name, p in packed.items():
        layer = gptq.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == scheme.bits_for(name)
        assert torch.equal(layer.expanded(torch.float32, torch.device("cpu")), pack.dequantize(p, layer.bits, 32))
    rtn = quantize_(copy.deepcopy(tiny_model), scheme, progress=False)

    x = torch.tensor(ids)
    with torch.inference_mode():
        ref = tiny_model(x)
        gptq_err, rtn_err = (gptq(x) - ref).norm(), (rtn(x) - ref).norm()
    assert gptq_err < 0.95 * rtn_err, f"GPTQ logits error {gptq_err:.3f} vs RTN {rtn_err:.3f}"


def test_gptq_pack_refuses_bad_input(tiny_model: Transformer) -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    with pytest.raises(LmforgeError, match="no calibration tokens"):
        gptq_pack(tiny_model, scheme, [], progress=False)
    with pytest.raises(LmforgeError, match="more than the model's context"):
        gptq_pack(tiny_model, scheme, [[1] * (tiny_model.cfg.max_seq_len + 1)], progress=False)
    quantized = quantize_(copy.deepcopy(tiny_model), scheme, progress=False)
    with pytest.raises(LmforgeError, match="already quantized"):
        gptq_pack(quantized, scheme, [[1, 2, 3]], progress=False)


# --- calibration text ----------------------------------------------------------------------------------------------


def test_default_calibration_text_is_bilingual_and_not_the_evaluation_text(tiny_tokenizer: Tokenizer) -> None:
    ids = calibration_ids(tiny_tokenizer, n_samples=8, seq_len=128)
    assert len(ids) == 8 and {len(s) for s in ids} == {128}
    text = (DATASETS / "calib_bilingual.txt").read_text(encoding="utf-8")
    assert 20_000 <= len(text.encode()) <= 40_000
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) > 3000 and text.count(" the ") > 100
    for heldout in HELDOUT:
        lines = {line for line in (DATASETS / heldout).read_text(encoding="utf-8").splitlines() if len(line) > 40}
        assert not lines & set(text.splitlines())


def test_short_text_gives_one_shorter_sample(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text("Hello, how are you today? 你好。", encoding="utf-8")
    (sample,) = calibration_ids(tiny_tokenizer, path, n_samples=16, seq_len=256)
    assert sample == tiny_tokenizer.encode(path.read_text(encoding="utf-8"), add_bos=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "calibration text is empty"),
        (b" \n\t\n", "calibration text is empty"),
        ("你好".encode("gbk"), "not UTF-8 \\(byte 0xc4 at byte offset 0\\)"),
        (b"fine so far \xff", "byte offset 12"),
    ],
)
def test_bad_calibration_files_are_named(
    tmp_path: Path, tiny_tokenizer: Tokenizer, content: bytes, message: str
) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message) as e:
        calibration_ids(tiny_tokenizer, path)
    assert str(path) in str(e.value)


def test_missing_calibration_file_is_named(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(LmforgeError, match="calibration text not found") as e:
        calibration_ids(tiny_tokenizer, tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value)
