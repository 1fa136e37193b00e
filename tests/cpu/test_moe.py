"""The fused routed-MoE layer (jm_moe) vs the float64 reference MoE and the model's JAX
reference, on every (ISA path, precision). Tolerance: reference.moe_bound with the numerics
that ran (first-order propagation of the per-matrix bounds of test_kernels through
silu(g) * u and down, plus the f32 weighted sum)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmoe import quant
from jaxmoe.cpu import reference as R
from jaxmoe.cpu._lib import CpuExtError
from jaxmoe.cpu.expert_store import ExpertStore
from tests.cpu.test_kernels import gemm_rows

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_experts(rng, n_experts, hidden, inter, fmt="fp8"):
    """Stacked ExpertsWeights-like fields + float64 per-expert matrices + subnormal masks."""
    def one(n, k):
        w = rng.standard_normal((n_experts, n, k)).astype(np.float32) * (0.5 / np.sqrt(k))
        if fmt == "bf16":
            wb = w.astype(ml_dtypes.bfloat16)
            return quant.DenseWeight(weight=wb), [R.bf16_values(wb[e]) for e in range(n_experts)], [None] * n_experts
        qs = [quant.quantize_fp8_blocks(w[e]) for e in range(n_experts)]
        q = np.stack([a for a, _ in qs])
        s = np.stack([b for _, b in qs])
        codes = q.view(np.uint8)
        return (quant.Fp8Weight(weight=q, weight_scale_inv=s),
                [R.fp8_dequant(codes[e], s[e]) for e in range(n_experts)], [R.is_subnormal(codes[e]) for e in range(n_experts)])

    (g, g64, gs), (u, u64, us), (d, d64, ds) = one(inter, hidden), one(inter, hidden), one(hidden, inter)
    sub = {e: (gs[e], us[e], ds[e]) for e in range(n_experts)}
    return (g, u, d), (g64, u64, d64), sub


def routing(rng, t, n_experts, top_k, pad=0.0):
    ids = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(t)]).astype(np.int32)
    ids[rng.random(ids.shape) < pad] = -1
    weights = rng.random((t, top_k)).astype(np.float32)
    return ids, weights


@SETTINGS
@given(n_experts=st.integers(1, 6), hidden=st.integers(1, 300), inter=st.integers(1, 200), t=st.integers(1, 40),
       top_k=st.integers(1, 4), seed=st.integers(0, 2**31), fmt=st.sampled_from(["fp8", "bf16"]),
       gemm=st.booleans())
def test_fused_moe_matches_reference(path_lib, n_experts, hidden, inter, t, top_k, seed, fmt, gemm):
    """Both paths: GEMV items of <= 16 tokens, or the GEMM path (forced from 1 row on)."""
    isa, precision, nat = path_lib
    top_k = min(top_k, n_experts)
    rng = np.random.default_rng(seed)
    (g, u, d), (g64, u64, d64), sub = make_experts(rng, n_experts, hidden, inter, fmt)
    ids, weights = routing(rng, t, n_experts, top_k, pad=0.1)
    x = rng.standard_normal((t, hidden)).astype(np.float32)
    with ExpertStore(3, native=nat) as store:
        store.add_layer(2, g, u, d)
        with gemm_rows(nat, 1 if gemm else -1):
            out = store.moe(2, x, ids, weights)
    ref = R.moe(x, ids, weights, g64, u64, d64)
    bound = R.moe_bound(x, ids, weights, g64, u64, d64, nat.numerics(), sub if fmt == "fp8" else None)
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"{isa}/{precision}: max err/bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("gemm", [False, True])
def test_many_tokens_and_small_batches(path_lib, monkeypatch, gemm):
    """Experts with more than 16 tokens (several items) and a fold budget so small that every
    item (GEMM path: every expert) is its own batch: same result as one big batch and as one
    thread, bit for bit."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(11)
    (g, u, d), (g64, u64, d64), sub = make_experts(rng, 3, 200, 100)
    t = 45 if isa != "scalar" else 20
    ids, weights = routing(rng, t, 3, 2)
    x = rng.standard_normal((t, 200)).astype(np.float32)
    with ExpertStore(1, native=nat) as store, gemm_rows(nat, 1 if gemm else -1):
        store.add_layer(0, g, u, d)
        out = store.moe(0, x, ids, weights)
        monkeypatch.setenv("JAXMOE_CPU_MOE_BUDGET", "1")
        small = store.moe(0, x, ids, weights)
        with nat.use_threads(1):
            one_thread = store.moe(0, x, ids, weights)
    np.testing.assert_array_equal(out, small)
    np.testing.assert_array_equal(out, one_thread)
    bound = R.moe_bound(x, ids, weights, g64, u64, d64, nat.numerics(), sub)
    assert np.all(np.abs(out - R.moe(x, ids, weights, g64, u64, d64)) <= bound)


def test_bf16_activations_in_and_out():
    rng = np.random.default_rng(5)
    (g, u, d), (g64, u64, d64), _ = make_experts(rng, 4, 130, 70)
    ids, weights = routing(rng, 6, 4, 2)
    x = rng.standard_normal((6, 130)).astype(ml_dtypes.bfloat16)
    with ExpertStore(1) as store:
        store.add_layer(0, g, u, d)
        out = store.moe(0, x, ids, weights)
        out32 = store.moe(0, x.astype(np.float32), ids, weights)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out, out32.astype(ml_dtypes.bfloat16))


def test_matches_model_jax_reference():
    """Equal to jaxmoe.model.moe.routed_experts on ExpertsWeights (the model's reference)."""
    from jaxmoe.model import moe as moe_mod
    from jaxmoe.model.weights import ExpertsWeights

    rng = np.random.default_rng(9)
    (g, u, d), (g64, u64, d64), sub = make_experts(rng, 5, 160, 96)
    ids, weights = routing(rng, 12, 5, 3)
    x = rng.standard_normal((12, 160)).astype(np.float32)
    jax_out = np.asarray(moe_mod.routed_experts(ExpertsWeights(gate_proj=g, up_proj=u, down_proj=d), x, ids, weights))
    with ExpertStore(1) as store:
        store.add_layer(0, g, u, d)
        out = store.moe(0, x, ids, weights)
        numerics = store._nat.numerics()  # the library default's: exact unless the environment says bf16
    ref = R.moe(x, ids, weights, g64, u64, d64)
    bound = R.moe_bound(x, ids, weights, g64, u64, d64, numerics, sub)
    assert np.all(np.abs(out - ref) <= bound)
    # the JAX reference computes in f32: within the f32 bound of float64, so out and jax_out
    # are within the kernels' bound + that
    f32 = R.moe_bound(x, ids, weights, g64, u64, d64, "f32", sub)
    assert np.all(np.abs(out - jax_out) <= bound + f32)


def test_moe_errors():
    rng = np.random.default_rng(1)
    (g, u, d), _, _ = make_experts(rng, 2, 20, 10)
    store = ExpertStore(2)
    store.add_layer(0, g, u, d)
    x = np.ones((1, 20), np.float32)
    with pytest.raises(CpuExtError, match="expert id 2 .* out of range"):
        store.moe(0, x, np.array([[2]]), np.ones((1, 1)))
    with pytest.raises(CpuExtError, match="layer 1 has no experts"):
        store.moe(1, x, np.array([[0]]), np.ones((1, 1)))
    with pytest.raises(CpuExtError, match="layer 5 out of range"):
        store.moe(5, x, np.array([[0]]), np.ones((1, 1)))
    with pytest.raises(CpuExtError, match="not fully loaded"):
        store.init_layer(1, 3, 20, 10)
        store.layer(1)
    out = store.moe(0, x, np.array([[-1]]), np.ones((1, 1)))  # all padding: zeros
    assert np.all(out == 0)
    store.free()
    with pytest.raises(CpuExtError, match="already freed"):
        store.moe(0, x, np.array([[0]]), np.ones((1, 1)))
