"""INT4 scale rules (jaxmoe.quant_int4): "signed" (the group's extreme -> -8) and
"search" (least squared error among candidates + a refit), against the "absmax" rule; and the
kernels on codes only those two rules produce (q = -8, i.e. nibble u = 0, and negative scales).

Error bounds, with s the stored (f16) scale of a group and q = clip(rint(w / s), -8, 7):
- every rule: an element not clipped (w / s in [-8.5, 7.5]) is within |s| / 2 of s q;
- signed: the extreme is exact up to the f16 rounding of s, and re-quantizing s q gives back
  the same codes and scales (a fixed point);
- search: each group's squared error <= that of absmax and of signed (both are candidates).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe import quant_int4 as Q
from jaxmoe.cpu.host_matrix import HostMatrix
from tests.cpu.test_int4_kernels import check, references


def _weights(kind: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) if kind == "gauss" else rng.standard_t(3, shape)
    return (w * np.exp(rng.uniform(-3, 3, (*shape[:-1], 1)))).astype(np.float32)


def _group_sse(w, q, s, k, group):
    wd = Q.dequantize_int4(q, s, k, group, np.float64)
    e = np.zeros((*w.shape[:-1], Q.padded_k(k, group)))
    e[..., :k] = (wd - w) ** 2
    return e.reshape(*w.shape[:-1], -1, group).sum(-1)


@pytest.mark.parametrize("rule", Q.SCALE_RULES)
@pytest.mark.parametrize("group", [32, 64, 256])
def test_unclipped_elements_within_half_a_step(rule, group):
    w = _weights("t3", (3, 9, 300), seed=group)
    q, s = Q.quantize_int4(w, group, scale_rule=rule)
    assert q.shape == (3, 9, Q.padded_k(300, group) // 2) and s.dtype == np.float16 and s.shape == (3, 9, -(-300 // group))
    wd = Q.dequantize_int4(q, s, 300, group)
    step = np.repeat(s.astype(np.float32), group, -1)[..., :300]
    ratio = np.divide(w, step, out=np.zeros_like(w), where=step != 0)
    inside = (ratio >= -8.5) & (ratio <= 7.5)
    assert np.all((np.abs(wd - w) <= 0.5 * np.abs(step) * (1 + 1e-3) + 1e-12)[inside])
    u = np.stack([q & 15, q >> 4], -1).reshape(3, 9, -1)
    assert np.all(u[..., 300:] == 8)  # padding columns: q = 0
    if rule == "absmax":
        assert np.all(inside) and u.min() >= 1
    else:
        assert u.min() == 0  # q = -8 is used


def test_signed_rule_maps_the_extreme_to_minus_8_and_is_a_fixed_point():
    w = _weights("gauss", (40, 256), seed=1)
    q, s = Q.quantize_int4(w, 32, scale_rule="signed")
    g = w.reshape(40, 8, 32)
    ext = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    qv = Q.unpack_int4(q).reshape(40, 8, 32)
    np.testing.assert_array_equal(np.take_along_axis(qv, np.abs(g).argmax(-1)[..., None], -1)[..., 0], -8)
    np.testing.assert_allclose(-8 * s.astype(np.float64), ext, rtol=2**-11)
    assert np.all(np.sign(s) == -np.sign(ext))  # a positive extreme takes a negative scale
    wd = Q.dequantize_int4(q, s, 256, 32)
    q2, s2 = Q.quantize_int4(wd, 32, scale_rule="signed")
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)


@pytest.mark.parametrize("kind", ["gauss", "t3"])
def test_search_never_worse_per_group_and_better_overall(kind):
    w = _weights(kind, (64, 1000), seed=2)
    sse = {r: _group_sse(w, *Q.quantize_int4(w, 32, scale_rule=r), 1000, 32) for r in Q.SCALE_RULES}
    floor = np.minimum(sse["absmax"], sse["signed"])
    assert np.all(sse["search"] <= floor * (1 + 1e-4) + 1e-30)
    total = {r: v.sum() for r, v in sse.items()}
    # these draws give search / absmax = 0.70 (gauss), 0.73 (t3); signed / absmax = 0.78, 0.78
    assert total["search"] < 0.8 * total["absmax"] and total["search"] < 0.95 * total["signed"]
    assert total["signed"] < 0.85 * total["absmax"]


def test_search_is_chunk_independent(monkeypatch):
    w = _weights("gauss", (50, 640), seed=3)
    q, s = Q.quantize_int4(w, 64)
    monkeypatch.setattr(Q, "_CHUNK", 64 * 7)  # 7 groups per chunk: many chunks, a ragged last one
    q2, s2 = Q.quantize_int4(w, 64)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)


def test_degenerate_groups_and_rule_errors():
    w = np.zeros((3, 64), np.float32)
    w[1, 3] = 2.5  # one positive value: exact with s = -2.5/8
    w[2, 32:] = 1e-9  # below the f16 range: s = 0, q = 0
    for rule in Q.SCALE_RULES:
        q, s = Q.quantize_int4(w, scale_rule=rule)
        wd = Q.dequantize_int4(q, s, 64)
        assert s[0].tolist() == [0, 0] and np.all(np.isfinite(wd))
        assert abs(wd[1, 3] - 2.5) <= (0 if rule != "absmax" else 2.5 / 14) and np.all(wd[2] == 0)
    with pytest.raises(ValueError, match="scale rule must be one of absmax, signed, search.*'minmax'"):
        Q.quantize_int4(w, scale_rule="minmax")
    with pytest.raises(ValueError, match="overflows"):
        Q.quantize_int4(np.full((1, 32), 1e6, np.float32), scale_rule="search")


def test_jax_dequantize_negative_scales():
    import jax.numpy as jnp

    from jaxmoe import quant

    w = _weights("gauss", (2, 5, 96), seed=4)
    iw = Q.Int4Weight.from_float(w, 32, scale_rule="search")
    assert np.any(np.asarray(iw.scales) < 0)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(iw, jnp.float32)),
                                  Q.dequantize_int4(np.asarray(iw.qweight), np.asarray(iw.scales), 96, 32))


@pytest.mark.parametrize("group,m", [(32, 3), (128, 3), (32, 40)])  # M = 40: the GEMM path
def test_kernels_with_minus_8_codes_and_negative_scales(isa_lib, group, m):
    """Every group holds q = -8 (u = 0) and q = 7, scales of both signs: the kernels' u - 8
    correction and f16 scale conversion, vs the float64 references of test_int4_kernels."""
    isa, nat = isa_lib
    rng = np.random.default_rng(group + m)
    n, k = 21, 5 * group + 16
    kg = Q.padded_k(k, group)
    codes = rng.integers(-8, 8, (n, kg))
    codes[:, 0::group], codes[:, 1::group] = -8, 7
    codes[:, k:] = 0
    codes[0, :k] = -8  # a row of nothing but u = 0
    u = (codes + 8).astype(np.uint8)
    qweight = u[:, 0::2] | (u[:, 1::2] << 4)
    scales = (rng.uniform(0.5, 2, (n, kg // group)) * rng.choice([-1, 1], (n, kg // group)) * 1e-2).astype(np.float16)
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-2, 2, (1, k)))).astype(np.float32)
    hm = HostMatrix.int4(qweight, scales, k, group, native=nat)
    try:
        y = hm.linear(x)
    finally:
        hm.free()
    exact, be, dense, bd = references(qweight, scales, k, group, x)
    check(y, exact, be, f"{isa} int4 g{group} q=-8 vs exact")
    check(y, dense, bd, f"{isa} int4 g{group} q=-8 vs dense")
