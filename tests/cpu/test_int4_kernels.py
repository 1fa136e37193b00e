"""INT4: numpy quantize/dequantize round trips, and the cpu_ext INT4 kernels on
every ISA path vs float64 numpy references.

Two references per output y = sum_g s_w[g] s_x[g] dot(q_w, q_x):
- exact: the kernel's own algebra in float64 (the int8 activations are reproduced bit for
  bit, integer dots are exact), bound (n_groups + 3) 2^-24 sum_g |s_w s_x dot_g| for the f32
  scaling and summation;
- dense: dequantized INT4 weights @ x in float64, plus the activation rounding:
  |x - s_x q_x| <= s_x / 2 (with slack for the f32 reciprocal) per element.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe import quant_int4 as Q
from jaxmoe.cpu._lib import CpuExtError
from jaxmoe.cpu.host_matrix import HostMatrix

U32 = 2.0**-24
SHAPES = [  # (n, k, group, m): K and N off multiples of 32/128, M from 1 to 64
    (1, 1, 32, 1),
    (5, 33, 32, 3),
    (37, 200, 64, 17),
    (130, 300, 32, 64),
    (9, 1000, 128, 2),
    (4, 257, 256, 5),
    (64, 512, 32, 4),
]


def quant_acts(x: np.ndarray, k_pad: int, group: int):
    """The kernels' int8 activations: per group sx = amax/127, q = rint(x * (127/amax)) in f32."""
    m, k = x.shape
    xp = np.zeros((m, k_pad), np.float32)
    xp[:, :k] = x
    g = xp.reshape(m, -1, group)
    amax = np.abs(g).max(-1).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint((g * inv[..., None]).astype(np.float32)).astype(np.int64)
    return q, (amax / np.float32(127)).astype(np.float32)


def references(qweight, scales, k, group, x):
    """(exact, bound_exact, dense, bound_dense) in float64, shapes [m, n]."""
    qw = Q.unpack_int4(qweight).astype(np.int64)  # [n, kg]
    n, kg = qw.shape
    qx, sx = quant_acts(x, kg, group)  # [m, ng, group], [m, ng]
    dots = np.einsum("ngj,mgj->mng", qw.reshape(n, -1, group), qx)  # exact integers
    terms = scales.astype(np.float64)[None] * sx.astype(np.float64)[:, None, :] * dots
    exact = terms.sum(-1)
    bound_exact = (scales.shape[1] + 3) * U32 * np.abs(terms).sum(-1) + 1e-30
    wd = Q.dequantize_int4(qweight, scales, k, group, np.float64)
    dense = x.astype(np.float64) @ wd.T
    sx_col = np.repeat(sx.astype(np.float64), group, axis=-1)[:, :k]
    bound_dense = 0.5 * (1 + 1e-5) * np.abs(wd) @ sx_col.T
    return exact, bound_exact, dense, bound_dense.T + bound_exact


def check(y, ref, bound, what):
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# ---- numpy format ---------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip(group):
    """The absmax rule (the other rules: tests/cpu/test_int4_scales.py)."""
    rng = np.random.default_rng(group)
    w = rng.standard_normal((3, 17, 300)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (3, 17, 1)))
    q, s = Q.quantize_int4(w, group, scale_rule="absmax")
    assert q.dtype == np.uint8 and q.shape == (3, 17, Q.padded_k(300, group) // 2)
    assert s.dtype == np.float16 and s.shape == (3, 17, -(-300 // group))
    wd = Q.dequantize_int4(q, s, 300, group)
    # error <= half a step per group (the f16 scale rounding is inside the step)
    step = np.repeat(s.astype(np.float32), group, -1)[..., :300]
    assert np.all(np.abs(wd - w) <= 0.5 * step * (1 + 1e-3) + 1e-12)
    # re-quantizing the dequantized weights is exact (codes and scales are a fixed point)
    q2, s2 = Q.quantize_int4(wd, group, scale_rule="absmax")
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)
    # codes are symmetric: u in [1, 15], padding columns hold q = 0 (u = 8)
    u = np.stack([q & 15, q >> 4], -1).reshape(3, 17, -1)
    assert u.min() >= 1 and u.max() <= 15 and np.all(u[..., 300:] == 8)


def test_zero_groups_and_errors():
    w = np.zeros((2, 64), np.float32)
    w[1, 40] = -3.0
    q, s = Q.quantize_int4(w, scale_rule="absmax")
    assert s[0].tolist() == [0, 0] and s[1, 0] == 0 and np.isclose(float(s[1, 1]), 3 / 7, rtol=1e-3)
    np.testing.assert_allclose(Q.dequantize_int4(q, s, 64), w, atol=1e-3)
    for rule in ("signed", "search"):  # -3 maps to -8 exactly: s = 3/8
        q, s = Q.quantize_int4(w, scale_rule=rule)
        assert s[0].tolist() == [0, 0] and s[1].tolist() == [0, 0.375]
        np.testing.assert_array_equal(Q.dequantize_int4(q, s, 64), w)
    with pytest.raises(ValueError, match="group size"):
        Q.quantize_int4(w, 48)
    with pytest.raises(ValueError, match="expert.7.*non-finite"):
        Q.quantize_int4(np.full((2, 32), np.inf, np.float32), name="expert.7")
    with pytest.raises(ValueError, match="overflows"):
        Q.quantize_int4(np.full((1, 32), 1e6, np.float32))


def test_jax_dequantize_matches_numpy():
    import jax.numpy as jnp

    from jaxmoe import quant

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 7, 70)).astype(np.float32)
    iw = Q.Int4Weight.from_float(w, 64)
    assert iw.shape == (2, 7, 70)
    np.testing.assert_allclose(np.asarray(quant.dequantize(iw, jnp.float32)),
                               Q.dequantize_int4(np.asarray(iw.qweight), np.asarray(iw.scales), 70, 64), rtol=0, atol=0)


# ---- kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,group,m", SHAPES)
def test_kernel_vs_reference(isa_lib, n, k, group, m):
    isa, nat = isa_lib
    assert nat.lib.jm_int4_isa() == ("scalar", "avx2", "avx512").index(isa)
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp(rng.uniform(-2, 2, (n, 1)))
    q, s = Q.quantize_int4(w, group)
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (1, k)))).astype(np.float32)
    hm = HostMatrix.int4(q, s, k, group, native=nat)
    try:
        y = hm.linear(x)
        assert hm.nbytes == -(-n // 4) * 4 * (-(-k // (8 * group)) * (4 * group + 16))
    finally:
        hm.free()
    exact, be, dense, bd = references(q, s, k, group, x)
    check(y, exact, be, f"{isa} int4 [{n},{k}] g{group} m{m} vs exact")
    check(y, dense, bd, f"{isa} int4 [{n},{k}] g{group} m{m} vs dense")


def test_paths_agree_and_bf16_io(isa_lib):
    """Every path gives the scalar result up to f32 summation order; bf16 in/out works."""
    import ml_dtypes

    isa, nat = isa_lib
    rng = np.random.default_rng(7)
    q, s = Q.quantize_int4(rng.standard_normal((33, 7168 // 8)).astype(np.float32))
    x = rng.standard_normal((3, 7168 // 8)).astype(np.float32)
    hm = HostMatrix.int4(q, s, 7168 // 8, native=nat)
    try:
        y = hm.linear(x)
        yb = hm.linear(x.astype(ml_dtypes.bfloat16), out_dtype=ml_dtypes.bfloat16)
        with nat.use_isa("scalar"):
            y0 = hm.linear(x)
    finally:
        hm.free()
    exact, be, _, _ = references(q, s, 7168 // 8, 32, x)
    check(y, y0, 2 * be, f"{isa} vs scalar")
    _, _, dense_b, bd_b = references(q, s, 7168 // 8, 32, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    check(yb.astype(np.float32), dense_b, bd_b + 2.0**-8 * np.abs(dense_b), f"{isa} bf16")


def test_create_errors():
    q, s = Q.quantize_int4(np.ones((4, 64), np.float32))
    with pytest.raises(CpuExtError, match="group size 48"):
        HostMatrix.int4(q, np.zeros((4, 2), np.float16), 64, 48)
    with pytest.raises(ValueError, match="scales must be float16"):
        HostMatrix.int4(q, s.astype(np.float32), 64)
    with pytest.raises(ValueError, match="scales must be float16"):
        HostMatrix.int4(q, s, 100)
