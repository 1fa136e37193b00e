"""The fused routed MoE (jm_moe) with INT4 experts, on every ISA path:
- vs a float64 emulation of the kernels' algebra (int8 activations per group reproduced,
  exact integer dots): agreement to f32 rounding, up to rare one-step flips of an activation
  code where the f32 and float64 values of silu(g)*u straddle a rounding boundary;
- vs the model's pure-JAX reference MoE on the dequantized INT4 weights (f32, activations not
  quantized): the int8 activation error only;
- through XLA (jit + FFI, `routed_experts` on HostExperts): equal to the direct call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import quant_int4 as Q
from jaxmoe.cpu._lib import CpuExtError
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.model.weights import ExpertsWeights
from tests.cpu.test_int4_kernels import references


def make_int4_experts(rng, n_experts, hidden, inter, group):
    def one(n, k):
        w = rng.standard_normal((n_experts, n, k)).astype(np.float32) * (0.5 / np.sqrt(k))
        return Q.Int4Weight.from_float(w, group)

    return one(inter, hidden), one(inter, hidden), one(hidden, inter)


def routing(rng, t, n_experts, top_k, pad=0.1):
    ids = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(t)]).astype(np.int32)
    ids[rng.random(ids.shape) < pad] = -1
    return ids, rng.random((t, top_k)).astype(np.float32)


def emulated_moe(x, ids, weights, experts):
    """float64 MoE in which every matmul is the kernels' INT4 x int8 algebra."""
    def lin(w, e, a):  # a [1, k] f32 -> [n] float64
        return references(np.asarray(w.qweight)[e], np.asarray(w.scales)[e], w.k, w.group, a)[0][0]

    g, u, d = experts
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gv, uv = lin(g, e, x[t:t + 1]), lin(u, e, x[t:t + 1])
            h = (gv / (1 + np.exp(-gv)) * uv).astype(np.float32)
            out[t] += float(weights[t, j]) * lin(d, e, h[None])
    return out


CASES = [(4, 96, 40, 5, 2, 32), (3, 300, 200, 17, 2, 64)]


@functools.cache
def case(n_experts, hidden, inter, t, top_k, group):
    """Inputs and both references, computed once for all ISA paths."""
    from jaxmoe.model.moe import routed_experts

    rng = np.random.default_rng(hidden + t)
    experts = make_int4_experts(rng, n_experts, hidden, inter, group)
    ids, weights = routing(rng, t, n_experts, top_k)
    x = rng.standard_normal((t, hidden)).astype(np.float32)
    emu = emulated_moe(x, ids, weights, experts)
    jax_out = np.asarray(jax.jit(routed_experts)(ExpertsWeights(*experts), jnp.asarray(x), jnp.asarray(ids),
                                                 jnp.asarray(weights)))
    return experts, ids, weights, x, emu, jax_out


@pytest.mark.parametrize("params", CASES)
def test_int4_moe_matches_references(isa_lib, params):
    isa, nat = isa_lib
    experts, ids, weights, x, emu, jax_out = case(*params)
    with ExpertStore(2, native=nat) as store:
        store.add_layer(1, *experts)
        out = store.moe(1, x, ids, weights)
    scale = np.abs(out).max() + 1e-30
    assert np.abs(out - emu).max() <= 2e-3 * scale, f"{isa}: vs emulation {np.abs(out - emu).max() / scale:.3g}"
    rel = np.linalg.norm(out - jax_out) / np.linalg.norm(jax_out)
    assert rel < 2e-2, f"{isa}: vs the JAX reference on dequantized INT4 weights, relative L2 {rel:.3g}"


def test_int4_moe_in_jit_equals_direct():
    from jaxmoe.cpu import placement  # noqa: F401  (registers HostExperts on routed_experts)
    from jaxmoe.model.moe import routed_experts

    rng = np.random.default_rng(3)
    experts = make_int4_experts(rng, 5, 128, 64, 32)
    ids, weights = routing(rng, 7, 5, 2)
    x = rng.standard_normal((7, 128)).astype(np.float32)
    with ExpertStore(1) as store:
        layer = store.add_layer(0, *experts)
        direct = store.moe(0, x, ids, weights)
        jitted = np.asarray(jax.jit(lambda a, i, w: routed_experts(layer, a, i, w))(x, ids, weights))
    np.testing.assert_array_equal(jitted, direct)


def test_mixed_formats_refused():
    from jaxmoe import quant

    rng = np.random.default_rng(4)
    g, u, d = make_int4_experts(rng, 2, 64, 32, 32)
    with ExpertStore(1) as store:
        store.add_layer(0, g, u, d)
        w = rng.standard_normal((2, 64, 32)).astype(np.float32)
        fp8 = [quant.quantize_fp8_blocks(w[e]) for e in range(2)]
        from jaxmoe.cpu.host_matrix import HostMatrix

        store.set_expert(0, 1, HostMatrix.int4(np.asarray(g.qweight)[1], np.asarray(g.scales)[1], 64),
                         HostMatrix.int4(np.asarray(u.qweight)[1], np.asarray(u.scales)[1], 64),
                         HostMatrix.fp8(*fp8[1]))
        with pytest.raises(CpuExtError, match="mixes expert weight formats"):
            store.moe(0, np.ones((1, 64), np.float32), np.array([[1]]), np.ones((1, 1)))
