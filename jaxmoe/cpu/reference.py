"""float64 numpy references for the cpu_ext kernels, and the error bounds the tests use.

FP8 semantics (what every kernel promises, see cpu_ext/include/jaxmoe_cpu.h): an e4m3 code is
its exact e4m3fn value for the 254 non-NaN codes and +-480 for the NaN codes 0x7f/0xff (the
shift decode extends the exponent pattern; checkpoints never hold NaN codes).

Error bounds, per output y = sum_k w_k x_k, with S = sum_k |w_k x_k|:
- scalar / AVX2 (f32 activations, f32 accumulation): the folded activation x*s*2^56 is one
  f32 rounding (rel. u = 2^-24), each product and each of the <= K additions another, so
  |err| <= (K + 2) u S  (the classic gamma_n bound of recursive or blocked summation).
- AVX-512 BF16: activations are rounded to bf16 (rel. 2^-9, x and scale folded together),
  then f32 dot products: |err| <= (2^-8 + (K + 2) u) S + F, where F = sum over the
  subnormal FP8 codes of |w_k x_k| (those decode to bf16 denormals that vdpbf16ps flushes).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

U32 = 2.0**-24
BF16_REL = 2.0**-8  # 2 x the unit roundoff 2^-9: covers x and the folded scale rounding


def fp8_decode(codes: np.ndarray) -> np.ndarray:
    """e4m3 byte codes -> float64 values under the kernel contract (NaN codes = +-480)."""
    b = np.asarray(codes).view(np.uint8).astype(np.int64)
    e = (b >> 3) & 15
    m = b & 7
    mag = np.where(e > 0, np.ldexp(1.0 + m / 8.0, e - 7), np.ldexp(m / 8.0, -6))
    return np.where(b & 0x80, -mag, mag)


def is_subnormal(codes: np.ndarray) -> np.ndarray:
    b = np.asarray(codes).view(np.uint8)
    return ((b & 0x78) == 0) & ((b & 7) != 0)


def expand_scales(scale: np.ndarray, n: int, k: int, block: int = 128) -> np.ndarray:
    s = np.asarray(scale, np.float64)
    return np.repeat(np.repeat(s, block, 0), block, 1)[:n, :k]


def fp8_dequant(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[N, K] codes + [ceil(N/128), ceil(K/128)] scales -> float64 [N, K]."""
    n, k = q.shape
    return fp8_decode(q) * expand_scales(scale, n, k)


def bf16_values(w: np.ndarray) -> np.ndarray:
    """bf16 array (ml_dtypes) or uint16 bits -> float64."""
    w = np.asarray(w)
    if w.dtype == np.uint16:
        w = w.view(ml_dtypes.bfloat16)
    return w.astype(np.float64)


def linear(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """y = x @ W^T in float64."""
    return np.asarray(x, np.float64) @ w64.T


def linear_bound(x: np.ndarray, w64: np.ndarray, isa: str, subnormal: np.ndarray | None = None) -> np.ndarray:
    """Elementwise bound on |y_kernel - y_ref| for the ISA path (module docstring)."""
    x64 = np.abs(np.asarray(x, np.float64))
    k = w64.shape[1]
    s = x64 @ np.abs(w64).T
    if isa == "avx512":
        flushed = 0.0 if subnormal is None else x64 @ np.abs(np.where(subnormal, w64, 0.0)).T
        return (BF16_REL + (k + 2) * U32) * s + flushed + 1e-30
    return (k + 2) * U32 * s + 1e-30


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def moe(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: list, up: list, down: list) -> np.ndarray:
    """out[t] = sum_j w[t,j] down_e(silu(gate_e x) * up_e x) in float64; ids < 0 skipped.
    gate/up/down: per-expert float64 [N, K] matrices."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += float(weights[t, j]) * (down[e] @ h)
    return out


def moe_bound(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: list, up: list, down: list, isa: str, sub: dict | None = None) -> np.ndarray:
    """First-order bound on |out_kernel - out_ref|: the linear bounds of gate and up
    (eps_g, eps_u) propagate through h = silu(g) u as |silu'(g)| |u| eps_g + |silu(g)| eps_u
    (|silu'| <= 1.1), then through down (its own linear bound on h plus |W_d| |dh|), plus
    f32 rounding of h and of the weighted sum. `sub`: expert -> (gate, up, down) subnormal
    masks for the AVX-512 path. A 1.5x factor covers the second-order terms."""
    x = np.asarray(x, np.float64)
    bound = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            sg, su, sd = sub[e] if sub else (None, None, None)
            g, u = gate[e] @ x[t], up[e] @ x[t]
            eg = linear_bound(x[t][None], gate[e], isa, sg)[0]
            eu = linear_bound(x[t][None], up[e], isa, su)[0]
            h = silu(g) * u
            dh = 1.1 * np.abs(u) * eg + np.abs(silu(g)) * eu + 4 * U32 * np.abs(h)
            y = down[e] @ h
            ey = linear_bound(h[None], down[e], isa, sd)[0] + np.abs(down[e]) @ dh
            bound[t] += abs(float(weights[t, j])) * (ey + (ids.shape[1] + 1) * U32 * np.abs(y))
    return 1.5 * bound + 1e-30
