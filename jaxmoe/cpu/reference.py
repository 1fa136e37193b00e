"""float64 numpy references for the cpu_ext kernels, and the error bounds the tests use.

FP8 semantics (what every kernel promises, see cpu_ext/include/jaxmoe_cpu.h): an e4m3 code is
its exact e4m3fn value for the 254 non-NaN codes and +-480 for the NaN codes 0x7f/0xff (the
shift decode extends the exponent pattern; checkpoints never hold NaN codes).

Error bounds are keyed by the *numerics* of the kernels that ran (`Native.numerics()`), not
by the ISA: "f32" (precision exact on any ISA path, or bf16 where the path has no bf16 dot)
or "bf16" (bf16 activations and vdpbf16ps dot products). Per output
y = sum_k s_b(k) w_k x_k, with w64_k = s_b(k) w_k the dequantized weight, S = sum_k |w64_k x_k|,
u = 2^-24 and gamma_n = n u / (1 - n u):

The summation order (both numerics, GEMV and GEMM paths alike): for every 128-column block b,
L lane partial sums (L = 16 on AVX-512, 8 on AVX2, 1 = sequential on scalar) accumulate the
products w_k x_k of the block by fma from zero; the block's lanes are multiplied by its scale
s_b and added to the L running sums with one fma each; at the end the L lanes are summed
pairwise. Every product is exact inside its fma and so is the product lane * s_b, so each
term's path through the sum meets at most
    min(K, 128) (its lane in the block) + ceil(K/128) (the block fmas) + log2(16) (the
    horizontal sum)  <=  K + 5
roundings of relative size <= u, and the standard argument for any summation tree gives
    f32:  |err| <= gamma_{K+5} S + eta.
The K + 5 majorant does not depend on L, so one bound holds on every ISA path and for any
grouping of the in-block terms.

bf16: x * 2^56 is rounded to bf16 once (an exact power-of-two scaling, for |x| < 2^71, then
one rounding of relative size <= 2^-8: bf16 has 8 significant bits); the FP8 shift decode
gives bf16 values w * 2^-120 exactly, and the 2^64 comes back in the (exact) scale product
(BF16 weights are bf16 already: s_b = 1, the same argument).
bf16 x bf16 products are exact in f32, the sum has the f32 paths' structure, so
    bf16: |err| <= (2^-8 (1 + gamma_{K+5}) + gamma_{K+5}) S + F + eta,
where F = sum |w64_k x_k| over the subnormal FP8 codes (bf16 denormals after the shift
decode, which vdpbf16ps reads as zero; a bf16 weight matrix has none in practice).

eta covers underflow, where the relative model fails: each of the <= 3K + 32 operations of an
output (products, in-block adds, block fmas of all L lanes, horizontal adds) whose result
lands below 2^-126 (subnormal, or flushed to zero, like vdpbf16ps's tiny products) errs by
<= 2^-126 in the units of its accumulator. Those are real units after the block fma, and real
units / s_b inside a block (/ (s_b 2^64) on the bf16 path); s_b <= 2^9 max_k |w64_k| for any
block holding a nonzero code (the smallest nonzero e4m3 value is 2^-9), and a block without
one sums exact zeros, so
    eta = (3K + 32) 2^-126 (1 + 2^9 max_k |w64_k|)          (f32)
    eta = (3K + 32) 2^-126 (1 + 2^73 max_k |w64_k|)         (bf16).
It is ~1e-35 (f32) and ~1e-16 K max|w| (bf16): never what a test's tolerance rests on.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

U32 = 2.0**-24  # f32 unit roundoff
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)
NUMERICS = ("f32", "bf16")  # Native.numerics()


def gamma(n: int | np.ndarray) -> float | np.ndarray:
    """gamma_n = n u / (1 - n u), u = 2^-24: the relative error of n rounded f32 operations."""
    nu = np.asarray(n, np.float64) * U32
    if np.any(nu >= 1):
        raise ValueError(f"gamma_n undefined for n u >= 1 (n = {n})")
    return nu / (1.0 - nu)


def roundings(k: int) -> int:
    """The rounding count per term the bounds use: K + 5 >= min(K, 128) + ceil(K/128) + 4."""
    return k + 5


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


def _check_numerics(numerics: str) -> None:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS} (Native.numerics()), got {numerics!r}")


def linear_bound(x: np.ndarray, w64: np.ndarray, numerics: str, subnormal: np.ndarray | None = None) -> np.ndarray:
    """Elementwise bound on |y_kernel - y_ref| for y = x @ w64^T computed with `numerics`
    ("f32" or "bf16", module docstring). subnormal: [N, K] mask of the subnormal FP8 codes
    (flushed on the bf16 numerics; ignored on f32). x [M, K] -> [M, N]."""
    _check_numerics(numerics)
    x64 = np.abs(np.asarray(x, np.float64))
    aw = np.abs(w64)
    k = w64.shape[1]
    g = gamma(roundings(k))
    s = x64 @ aw.T
    wmax = aw.max(axis=1, initial=0.0)[None, :]
    if numerics == "f32":
        return g * s + (3 * k + 32) * 2.0**-126 * (1.0 + 2.0**9 * wmax)
    flushed = 0.0 if subnormal is None else x64 @ np.where(subnormal, aw, 0.0).T
    eta = (3 * k + 32) * 2.0**-126 * (1.0 + 2.0**73 * wmax)
    return (BF16_U * (1.0 + g) + g) * s + flushed + eta


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


def moe_bound(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: list, up: list, down: list, numerics: str,
              sub: dict | None = None) -> np.ndarray:
    """First-order bound on |out_kernel - out_ref|: the linear bounds of gate and up
    (eps_g, eps_u) propagate through h = silu(g) u as |silu'(g)| |u| eps_g + |silu(g)| eps_u
    (|silu'| <= 1.1), then through down (its own linear bound on h plus |W_d| |dh|), plus
    f32 rounding of h and of the weighted sum. numerics: "f32" or "bf16" (`Native.numerics()`;
    on "bf16" h is rounded to bf16 again inside down's linear bound). `sub`: expert ->
    (gate, up, down) subnormal masks (flushed on "bf16"). A 1.5x factor covers the
    second-order terms."""
    _check_numerics(numerics)
    x = np.asarray(x, np.float64)
    bound = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            sg, su, sd = sub[e] if sub else (None, None, None)
            g, u = gate[e] @ x[t], up[e] @ x[t]
            eg = linear_bound(x[t][None], gate[e], numerics, sg)[0]
            eu = linear_bound(x[t][None], up[e], numerics, su)[0]
            h = silu(g) * u
            dh = 1.1 * np.abs(u) * eg + np.abs(silu(g)) * eu + 4 * U32 * np.abs(h)
            y = down[e] @ h
            ey = linear_bound(h[None], down[e], numerics, sd)[0] + np.abs(down[e]) @ dh
            bound[t] += abs(float(weights[t, j])) * (ey + (ids.shape[1] + 1) * U32 * np.abs(y))
    return 1.5 * bound + 1e-30
