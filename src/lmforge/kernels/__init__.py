"""Native CPU kernels for decoding, built on first use with the system C compiler and loaded through ctypes.

Why native: decode speed on CPU is weight bytes read per second, and PyTorch's one-row fp32 GEMV reaches about
half of this machine's memory bandwidth (single-threaded MKL on AVX2). `cpu.c` splits output features across
PyTorch's own OpenMP threads and streams each weight row once, which reaches the bandwidth of a plain reduction.

How: the C file ships inside the package; `library()` compiles it once per source/compiler/CPU-flags combination
into the lmforge cache (an atomic rename, so concurrent first runs are safe) in about a second. With no compiler,
a failed build, or LMFORGE_NATIVE=0, it returns None after saying so once, and callers use PyTorch's own ops.
The ctypes call releases the GIL and costs a few microseconds; under `torch.compile` callers use the registered
custom ops instead, which the compiler treats as opaque. This module does not decide which layers use them:
`fastpath.prepare_for_decode` does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from lmforge.paths import cache_dir

SOURCES = [Path(__file__).with_name(n) for n in ("cpu.c", "quant.c", "layer.c", "kernels.h", "simd.h")]
MAX_ROWS = 8  # lmf_linear_f32 handles at most this many activation rows; more rows are a GEMM for MKL


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _compile_flags() -> list[str]:
    # -ffast-math: lets reductions vectorize and expf use glibc's vector versions; cpu.c avoids inf/nan on purpose.
    flags = ["-O3", "-ffast-math", "-fPIC", "-shared", "-fopenmp", "-std=c11"]
    cpu = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"] + (["-mf16c"] if "f16c" in cpu else [])
    return flags


def _say_once(message: str) -> None:
    print(f"lmforge: note: {message}", file=sys.stderr)


def _build(compiler: str, flags: list[str], out: Path) -> None:
    from lmforge.fileio import atomic_path

    with atomic_path(out) as tmp:
        sources = [str(p) for p in SOURCES if p.suffix == ".c"]
        proc = subprocess.run([compiler, *flags, *sources, "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (said once on stderr) when it cannot be built or loaded here."""
    if os.environ.get("LMFORGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _say_once("no C compiler found; decoding uses PyTorch's kernels (about 2x slower). Install gcc to speed it up.")
        return None
    flags = _compile_flags()
    text = b"".join(p.read_bytes() for p in SOURCES) + " ".join([compiler, *flags, platform.machine()]).encode()
    key = hashlib.sha256(text).hexdigest()
    out = cache_dir() / "kernels" / f"liblmforge_cpu-{key[:16]}.so"
    try:
        if not out.exists():
            _build(compiler, flags, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError) as e:
        _say_once(f"native kernels unavailable ({e}); decoding uses PyTorch's kernels")
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.lmf_linear_f32.argtypes = [ptr, ptr, ptr, ptr, i32, ptr, i32, i32]
    lib.lmf_rms_norm_f32.argtypes = [ptr, ptr, ptr, i32, i32, ctypes.c_float]
    lib.lmf_decode_attention_f32.argtypes = [
        ptr,
        i32,
        i32,
        i32,
        i32,
        ptr,
        ptr,
        ptr,
        i32,
        ptr,
        ptr,
        i32,
        ptr,
        ctypes.c_float,
    ]
    lib.lmf_silu_mul_f32.argtypes = [ptr, ptr, i32, i32]
    lib.lmf_linear_q.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, ptr, i32, i32]
    lib.lmf_dequant_q.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, ptr]
    lib.lmf_decode_layer.argtypes = [ptr, ptr, i32, i32, ptr, i32, ptr, ptr, i32]
    return lib


class _Mat(ctypes.Structure):  # kernels.h: Mat
    _fields_ = [(n, ctypes.c_int) for n in ("bits", "group", "count", "in_features")] + [
        (n, ctypes.c_void_p) for n in ("ws", "ds", "ms", "biases", "ns")
    ]


class _Layer(ctypes.Structure):  # kernels.h: Layer
    _fields_ = [
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        *[(n, ctypes.c_int) for n in ("H", "Hkv", "D", "I")],
        *[(n, _Mat) for n in ("qkv", "o", "gate_up", "down")],
        *[
            (n, ctypes.c_void_p)
            for n in ("cos_t", "sin_t", "h", "qkv_out", "y", "o_out", "gu", "act", "xq", "xd", "xs")
        ],
    ]


class LinearPlan:
    """One or more weight matrices (N_i, K) that read the same input, as raw pointers ready for lmf_linear_f32.

    Their outputs come out side by side, as from one stacked matrix, without copying the weights into one. The plan
    holds pointers: its tensors must stay where they are (a prepared model is not moved or re-typed afterwards).
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None]) -> None:
        if not all(w.is_contiguous() and w.dtype == torch.float32 for w in weights):
            raise ValueError("LinearPlan needs contiguous float32 weights")
        self.weights, self.biases = weights, biases  # kept alive: the kernel reads them through raw pointers
        self.out_features = sum(w.shape[0] for w in weights)
        self.in_features = weights[0].shape[1]
        count = len(weights)
        self._arrays = (
            (ctypes.c_void_p * count)(*[w.data_ptr() for w in weights]),
            (ctypes.c_void_p * count)(*[None if b is None else b.data_ptr() for b in biases]),
            (ctypes.c_int * count)(*[w.shape[0] for w in weights]),
        )
        self._args = [ctypes.cast(a, ctypes.c_void_p) for a in self._arrays] + [count]

    function = "lmf_linear_f32"

    def mat(self) -> _Mat:
        ws, biases, ns = self._args[:3]
        return _Mat(32, 0, self._args[3], self.in_features, ws, None, None, biases, ns)


class QuantPlan:
    """Like LinearPlan, for quantized matrices of one scheme (see quant.c for the layout): packed weights (N_i, ...),
    fp16 scales (N_i, K / group), fp16 INT4 offsets (None for INT8) and optional float biases."""

    function = "lmf_linear_q"

    def __init__(
        self,
        qweights: list[Tensor],
        scales: list[Tensor],
        mins: list[Tensor | None],
        biases: list[Tensor | None],
        bits: int,
        group: int,
    ) -> None:
        self.tensors = (qweights, scales, mins, biases)  # kept alive: the kernel reads them through raw pointers
        self.out_features = sum(q.shape[0] for q in qweights)
        self.in_features = scales[0].shape[1] * group
        count = len(qweights)

        def pointers(ts: list[Tensor | None]) -> ctypes.Array:
            return (ctypes.c_void_p * count)(*[None if t is None else t.data_ptr() for t in ts])

        self._arrays = (*map(pointers, self.tensors), (ctypes.c_int * count)(*[q.shape[0] for q in qweights]))
        self._args = [ctypes.cast(a, ctypes.c_void_p) for a in self._arrays] + [count, bits, group]

    def mat(self) -> _Mat:
        qs, ds, ms, biases, ns, count, bits, group = self._args
        return _Mat(bits, group, count, self.in_features, qs, ds, ms, biases, ns)


def linear(x: Tensor, plan: LinearPlan | QuantPlan, out: Tensor | None = None) -> Tensor:
    """x (..., K) @ the plan's stacked weights^T + biases, float32 on CPU, MAX_ROWS rows per kernel call.

    `out` (contiguous, the result's shape) is written and returned instead of a new tensor, as with every kernel here.
    """
    lib = library()
    assert lib is not None
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], plan.out_features), dtype=x.dtype) if out is None else out
    kernel = getattr(lib, plan.function)
    rows, k, n = x.numel() // plan.in_features, plan.in_features, plan.out_features
    for lo in range(0, rows, MAX_ROWS):  # more rows than one call takes: in turns (a batched decode step)
        m = min(MAX_ROWS, rows - lo)
        kernel(x.data_ptr() + 4 * lo * k, *plan._args, y.data_ptr() + 4 * lo * n, m, k)
    return y


class LayerPlan:
    """One transformer block for lmf_decode_layer: its norms, four stacked products (float or quantized, see
    LinearPlan/QuantPlan), attention shapes, RoPE tables, and scratch for `rows` activation rows."""

    def __init__(
        self,
        norms: tuple[Tensor, Tensor],
        eps: float,
        heads: tuple[int, int, int],
        plans: tuple[LinearPlan | QuantPlan, ...],
        rope: tuple[Tensor, Tensor],
        rows: int,
    ) -> None:
        qkv, o, gate_up, down = plans
        widths = [qkv.in_features, qkv.out_features, o.in_features, o.out_features, gate_up.out_features]
        self.buffers = [torch.empty(rows, w) for w in [*widths, down.in_features]]
        k_max = max(p.in_features for p in plans)
        self.quantized = [torch.empty(rows * k_max, dtype=torch.int8), torch.empty(rows * k_max // 32 + 1)]
        self.quantized.append(torch.empty_like(self.quantized[1]))
        self.keep = (norms, plans, rope)  # the struct below points into all of these
        self.struct = _Layer(
            norms[0].data_ptr(),
            norms[1].data_ptr(),
            eps,
            *heads,
            down.in_features,
            *(p.mat() for p in plans),
            rope[0].data_ptr(),
            rope[1].data_ptr(),
            *(t.data_ptr() for t in self.buffers + self.quantized),
        )


def decode_layer(plan: LayerPlan, x: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """One block's decode step on x (B, 1, hidden), in place: pos as for decode_attention; returns x."""
    lib = library()
    assert lib is not None
    b, hidden = x.shape[0], x.shape[-1]
    pos = pos.contiguous()
    lib.lmf_decode_layer(
        ctypes.byref(plan.struct),
        x.data_ptr(),
        b,
        hidden,
        pos.data_ptr(),
        int(pos.numel() > 1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[2],
    )
    return x


def dequantize(qweight: Tensor, scales: Tensor, mins: Tensor | None, bits: int, group: int) -> Tensor:
    """The float32 (N, K) matrix that a quantized weight stands for (see quant.c for the layout)."""
    lib = library()
    assert lib is not None
    n, k = scales.shape[0], scales.shape[1] * group
    out = torch.empty(n, k)
    lib.lmf_dequant_q(
        qweight.data_ptr(),
        scales.data_ptr(),
        None if mins is None else mins.data_ptr(),
        bits,
        group,
        n,
        k,
        out.data_ptr(),
    )
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    lib = library()
    assert lib is not None
    x = x.contiguous()
    y = torch.empty_like(x) if out is None else out
    d = x.shape[-1]
    lib.lmf_rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y


def decode_attention(
    qkv: Tensor,
    n_heads: int,
    n_kv: int,
    cos: Tensor,
    sin: Tensor,
    pos: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """One decode step of attention (see cpu.c): qkv (B, 1, (H + 2*Hkv) * D) is rotated in place with the RoPE tables
    cos/sin (max_pos, D) at each row's position, k/v are written into the caches (B, Hkv, max_len, D), and the
    attention output (B, 1, H * D) is returned. pos: int64, (1,) shared by all rows or (B, 1) one per row."""
    lib = library()
    assert lib is not None
    b, d = qkv.shape[0], k_cache.shape[-1]
    pos = pos.contiguous()
    out = torch.empty((b, 1, n_heads * d), dtype=qkv.dtype) if out is None else out
    lib.lmf_decode_attention_f32(
        qkv.data_ptr(),
        b,
        n_heads,
        n_kv,
        d,
        cos.data_ptr(),
        sin.data_ptr(),
        pos.data_ptr(),
        int(pos.numel() > 1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[2],
        out.data_ptr(),
        d**-0.5,
    )
    return out


def silu_mul(gate_up: Tensor, out: Tensor | None = None) -> Tensor:
    """silu(gate) * up from the fused (..., 2 * I) gate|up projection."""
    lib = library()
    assert lib is not None
    i = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], i), dtype=gate_up.dtype) if out is None else out
    lib.lmf_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * i), i)
    return out


# The same kernels as custom ops, for code that runs under torch.compile (an opaque call is all the compiler needs).
@torch.library.custom_op("lmforge::linear_f32", mutates_args=())
def linear_op(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> Tensor:
    return linear(x, LinearPlan(weights, biases))


@linear_op.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("lmforge::rms_norm_f32", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lmforge::decode_attention_f32", mutates_args=("qkv", "k_cache", "v_cache"))
def decode_attention_op(
    qkv: Tensor, n_heads: int, n_kv: int, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor
) -> Tensor:
    return decode_attention(qkv, n_heads, n_kv, cos, sin, pos, k_cache, v_cache)


@decode_attention_op.register_fake
def _(qkv: Tensor, n_heads: int, n_kv: int, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor):
    return qkv.new_empty((qkv.shape[0], 1, n_heads * k_cache.shape[-1]))


@torch.library.custom_op("lmforge::silu_mul_f32", mutates_args=())
def silu_mul_op(gate_up: Tensor) -> Tensor:
    return silu_mul(gate_up)


@silu_mul_op.register_fake
def _(gate_up: Tensor) -> Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("lmforge::linear_q", mutates_args=())
def linear_q_op(
    x: Tensor,
    qweights: list[Tensor],
    scales: list[Tensor],
    mins: list[Tensor | None],
    biases: list[Tensor | None],
    bits: int,
    group: int,
) -> Tensor:
    return linear(x, QuantPlan(qweights, scales, mins, biases, bits, group))


@linear_q_op.register_fake
def _(
    x: Tensor,
    qweights: list[Tensor],
    scales: list[Tensor],
    mins: list[Tensor | None],
    biases: list[Tensor | None],
    bits: int,
    group: int,
) -> Tensor:
    return x.new_empty((*x.shape[:-1], sum(q.shape[0] for q in qweights)))
