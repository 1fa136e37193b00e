"""The XLA custom calls (jax.ffi, CPU platform) inside jax.jit: bit-for-bit equal to the
direct cffi calls, and errors inside a handler surface as Python exceptions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmoe import quant
from jaxmoe.cpu import ops
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.host_matrix import HostMatrix


@pytest.fixture(scope="module")
def mats():
    rng = np.random.default_rng(0)
    q, s = quant.quantize_fp8_blocks(rng.standard_normal((300, 200)).astype(np.float32))
    fp8 = HostMatrix.fp8(q, s)
    bf16 = HostMatrix.bf16(rng.standard_normal((70, 200)).astype(ml_dtypes.bfloat16))
    yield fp8, bf16
    fp8.free()
    bf16.free()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_linear_in_jit_equals_cffi(mats, dtype, lead):
    x = np.random.default_rng(1).standard_normal(lead + (200,)).astype(dtype)
    for m in mats:
        want = m.linear(x, out_dtype=dtype)
        got = jax.jit(ops.linear)(x, m.pytree())
        assert got.dtype == dtype and got.shape == lead + (m.n,)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_linear_through_host_aware_dispatch(mats):
    """quant.linear runs HostLinear on the kernel (registered by jaxmoe.cpu.placement)."""
    import jaxmoe.cpu.placement  # noqa: F401
    from jaxmoe.quant import linear

    fp8, _ = mats
    x = np.random.default_rng(2).standard_normal((3, 200)).astype(np.float32)
    got = jax.jit(lambda x, w: linear(x, w) * 2.0)(x, fp8.pytree())
    np.testing.assert_array_equal(np.asarray(got), fp8.linear(x) * 2.0)
    dense = quant.DenseWeight(weight=jnp.ones((4, 200), jnp.float32))
    np.testing.assert_allclose(np.asarray(linear(x, dense)), np.asarray(quant.linear(x, dense)))
    with pytest.raises(TypeError, match="cannot be dequantized"):
        quant.dequantize(fp8.pytree())


def test_moe_in_jit_equals_cffi():
    rng = np.random.default_rng(3)
    e, h, i, t = 4, 130, 60, 9

    def stacked(n, k):
        qs = [quant.quantize_fp8_blocks(rng.standard_normal((n, k)).astype(np.float32) * 0.1) for _ in range(e)]
        return quant.Fp8Weight(weight=np.stack([a for a, _ in qs]), weight_scale_inv=np.stack([b for _, b in qs]))

    with ExpertStore(2) as store:
        layer = store.add_layer(1, stacked(i, h), stacked(i, h), stacked(h, i))
        x = rng.standard_normal((t, h)).astype(np.float32)
        ids = np.stack([rng.permutation(e)[:2] for _ in range(t)]).astype(np.int32)
        w = rng.random((t, 2)).astype(np.float32)

        @jax.jit
        def step(x, ids, w):
            return ops.moe_experts(x * 1.0, ids, w, layer) + 0.0

        np.testing.assert_array_equal(np.asarray(step(x, ids, w)), store.moe(1, x, ids, w))
        xb = x.astype(ml_dtypes.bfloat16)
        got = jax.jit(ops.moe_experts, static_argnums=3)(xb, ids, w, layer)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), store.moe(1, xb, ids, w))

        with pytest.raises(Exception, match=r"expert id \d+ .* out of range"):
            step(x, ids + 7, w).block_until_ready()
        with pytest.raises(ValueError, match=r"x must be \[tokens, 130\]"):
            ops.moe_experts(x[:, :10], ids, w, layer)
    with pytest.raises(Exception, match="not a live jaxmoe expert store handle"):
        step(x, ids, w).block_until_ready()  # freed store: an error, not a crash


def test_freed_matrix_is_an_error():
    q, s = quant.quantize_fp8_blocks(np.ones((8, 8), np.float32))
    m = HostMatrix.fp8(q, s)
    w = m.pytree()
    m.free()
    with pytest.raises(Exception, match="not a live jaxmoe matrix handle"):
        jax.jit(ops.linear)(np.ones((1, 8), np.float32), w).block_until_ready()


def test_moe_layer_as_traced_operand_in_scan():
    """moe_dyn: the layer index is an operand, so a lax.scan over layers can carry it."""
    rng = np.random.default_rng(4)
    e, h, i, t, n_layers = 3, 64, 40, 5, 3

    def stacked(n, k):
        qs = [quant.quantize_fp8_blocks(rng.standard_normal((n, k)).astype(np.float32) * 0.1) for _ in range(e)]
        return quant.Fp8Weight(weight=np.stack([a for a, _ in qs]), weight_scale_inv=np.stack([b for _, b in qs]))

    with ExpertStore(n_layers) as store:
        layers = [store.add_layer(li, stacked(i, h), stacked(i, h), stacked(h, i)) for li in range(n_layers)]
        x = rng.standard_normal((t, h)).astype(np.float32)
        ids = np.stack([rng.permutation(e)[:2] for _ in range(t)]).astype(np.int32)
        w = rng.random((t, 2)).astype(np.float32)

        @jax.jit
        def all_layers(x):
            def body(x, li):
                return ops.moe_experts(x, ids, w, layers[0], layer_index=li), None
            return jax.lax.scan(body, x, jnp.arange(n_layers, dtype=jnp.int32))[0]

        want = x
        for li in range(n_layers):
            want = store.moe(li, want, ids, w)
        np.testing.assert_array_equal(np.asarray(all_layers(x)), want)
        with pytest.raises(Exception, match="layer 7 out of range"):
            jax.jit(lambda x: ops.moe_experts(x, ids, w, layers[0], layer_index=7))(x).block_until_ready()
