"""Grouped (per-head) kernels and MLA's kv_b_proj on the host (jaxmoe.cpu.attention).

Tolerance: the per-matrix bound of test_kernels with the numerics that ran (`nat.numerics()`:
gamma_{K+5} sum|w x| for "f32", plus 2^-8 sum|w x| and the flushed subnormal mass for "bf16"),
applied head by head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import quant
from jaxmoe.cpu import ops
from jaxmoe.cpu import reference as R
from jaxmoe.cpu._lib import PRECISION_NAMES
from jaxmoe.cpu.attention import absorb_out, absorb_q, host_kv_b
from jaxmoe.cpu.host_matrix import HostGroup, live_owners


def random_group(rng, g, n, k):
    qs = [quant.quantize_fp8_blocks(rng.standard_normal((n, k)).astype(np.float32)) for _ in range(g)]
    return np.stack([a for a, _ in qs]).view(np.uint8), np.stack([b for _, b in qs])


@pytest.mark.parametrize("g,n,k,m", [(1, 5, 7, 1), (4, 130, 200, 3), (3, 64, 129, 20)])
def test_grouped_linear_matches_reference(path_lib, g, n, k, m):
    isa, precision, nat = path_lib
    rng = np.random.default_rng(g * n + k)
    q, s = random_group(rng, g, n, k)
    x = rng.standard_normal((m, g, k)).astype(np.float32)
    grp = HostGroup.fp8(q, s, native=nat)
    try:
        y = grp.linear(x)
    finally:
        grp.free()
    for j in range(g):
        w64 = R.fp8_dequant(q[j], s[j])
        err = np.abs(y[:, j] - R.linear(x[:, j], w64))
        assert np.all(err <= R.linear_bound(x[:, j], w64, nat.numerics(), R.is_subnormal(q[j]))), f"group {j}"


def test_grouped_linear_in_jit_equals_cffi():
    rng = np.random.default_rng(1)
    q, s = random_group(rng, 6, 40, 130)
    grp = HostGroup.fp8(q, s)
    try:
        x = rng.standard_normal((2, 3, 6, 130)).astype(np.float32)
        got = jax.jit(ops.grouped_linear)(x, grp.pytree())
        np.testing.assert_array_equal(np.asarray(got), grp.linear(x))
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., 6, 130\]"):
            ops.grouped_linear(x[..., :5, :], grp.pytree())
    finally:
        grp.free()


@pytest.mark.parametrize("precision", PRECISION_NAMES)
@pytest.mark.parametrize("heads,nope,v,r", [(4, 16, 16, 32), (2, 128, 128, 512), (3, 64, 64, 96)])
def test_kv_b_on_host_matches_einsum(heads, nope, v, r, precision):
    """absorb_q / absorb_out / linear of a HostKvB (through XLA, on the selected ISA path) ==
    the model's einsums on the dequantized kv_b_proj (exact repacks of the same FP8 values),
    within the bound of the numerics that ran in each precision."""
    rng = np.random.default_rng(heads)
    wq, ws = quant.quantize_fp8_blocks(rng.standard_normal((heads * (nope + v), r)).astype(np.float32))
    w = quant.Fp8Weight(weight=wq, weight_scale_inv=ws)
    kvb, owners = host_kv_b(w, heads, nope, v)
    nat = owners[0]._nat
    try:
        with nat.use_precision(precision):
            if precision == "bf16" and not nat.lib.jm_bf16_dot():
                pytest.skip(f"the {nat.selected_isa()} path runs no bf16 dot product here")
            numerics = nat.numerics()
            codes = wq.view(np.uint8).reshape(heads, nope + v, r)
            w64 = R.fp8_dequant(wq.view(np.uint8), ws).reshape(heads, nope + v, r)
            q_nope = rng.standard_normal((1, 2, heads, nope)).astype(np.float32)
            o_lat = rng.standard_normal((1, 2, heads, r)).astype(np.float32)
            got_q = np.asarray(jax.jit(absorb_q)(kvb, q_nope))
            got_o = np.asarray(jax.jit(absorb_out)(kvb, o_lat))
            for h in range(heads):  # head h: W_uk^T [r, nope] and W_uv [v, r], as plain linears
                for x, got, w_h, c_h in ((q_nope, got_q, w64[h, :nope].T, codes[h, :nope].T),
                                         (o_lat, got_o, w64[h, nope:], codes[h, nope:])):
                    xh = x[0, :, h]
                    err = np.abs(got[0, :, h] - R.linear(xh, w_h))
                    assert np.all(err <= R.linear_bound(xh, w_h, numerics, R.is_subnormal(c_h))), f"head {h}"
            c_kv = rng.standard_normal((3, r)).astype(np.float32)
            w_all, c_all = w64.reshape(-1, r), codes.reshape(-1, r)
            err = np.abs(np.asarray(quant.linear(jnp.asarray(c_kv), kvb)) - R.linear(c_kv, w_all))
            assert np.all(err <= R.linear_bound(c_kv, w_all, numerics, R.is_subnormal(c_all))), "linear"
    finally:
        for o in owners:
            o.free()
    assert not any(h in live_owners for h in (kvb.linear.handle, kvb.uk_t.handle, kvb.uv.handle))


def test_kv_b_not_block_aligned_stays_as_is():
    """nope 96 + v 64: head 0's v rows straddle the 128-row scale boundary -> None."""
    wq, ws = quant.quantize_fp8_blocks(np.ones((2 * 160, 64), np.float32))
    assert host_kv_b(quant.Fp8Weight(weight=wq, weight_scale_inv=ws), 2, 96, 64) is None
    assert host_kv_b(quant.DenseWeight(weight=np.ones((64, 64), np.float32)), 2, 16, 16) is None
