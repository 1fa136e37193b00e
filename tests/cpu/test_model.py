"""The model forward (prefill and decode) on the CPU kernels == the reference forward.

Weights: the tiny config's synthetic FP8 checkpoint, loaded by the real loader. The kernels
run in exact precision (f32 numerics on every ISA path): each matmul is within
gamma_{K+5} sum|w x| of exact (K <= 128 here: ~8e-6), as is XLA's f32 reference, so logits
agree to ~1e-5 of their scale (asserted: 1e-4). The bf16 precision has no model-level bound:
its 2^-8 per matmul flips router choices of a random model, and one flip moves a logit by
O(1); its matmuls are checked against their bounds in test_kernels / test_moe /
test_attention instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe.cpu as jcpu
from jaxmoe import quant
from jaxmoe.config import ModelConfig
from jaxmoe.cpu.handles import HostExperts, HostLinear
from jaxmoe.loading import loader, synthetic
from jaxmoe.model import cache as cache_mod
from jaxmoe.model import forward

LOGIT_TOL = {"f32": 1e-4}  # by Native.numerics(): max |logit diff| / max |logit|


@pytest.fixture(autouse=True)
def exact_kernels():
    """Every test of this module in exact precision, whatever JAXMOE_CPU_PRECISION says."""
    nat = jcpu._lib.load()
    with nat.use_precision("exact"):
        assert nat.numerics() == "f32"
        yield nat


def logit_tol(nat) -> float:
    return LOGIT_TOL[nat.numerics()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ModelConfig.named("tiny")
    path = synthetic.write_synthetic_checkpoint(tmp_path_factory.mktemp("cpu_tiny") / "ckpt", cfg, fmt="fp8", seed=3)
    cfg, weights = loader.load_checkpoint(path)
    placed = jcpu.to_cpu_placement(weights)
    yield cfg, weights, placed
    jcpu.release(placed)


def test_placement_covers_every_large_matmul(tiny):
    cfg, _, placed = tiny
    host = lambda x: isinstance(x, (HostLinear, HostExperts))  # noqa: E731
    kinds = [type(x).__name__ for x in jax.tree_util.tree_leaves(placed, is_leaf=host)]
    n_moe = sum(1 for lw in placed.layers if hasattr(lw.mlp, "experts"))
    assert kinds.count("HostExperts") == n_moe > 0
    assert isinstance(placed.lm_head, HostLinear)
    for lw in placed.layers:
        a = lw.self_attn
        assert all(isinstance(w, HostLinear) for w in (a.q_a_proj, a.q_b_proj, a.kv_a_proj_with_mqa, a.o_proj))
        # dequantized once (XLA's FP8 conversion per decode step is slow on the CPU)
        assert isinstance(a.kv_b_proj, quant.DenseWeight) and a.kv_b_proj.weight.dtype == jnp.float32


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_forward_on_cpu_kernels_matches_reference(tiny, form, exact_kernels):
    cfg, weights, placed = tiny
    fn = jax.jit(getattr(forward, f"forward_{form}"), static_argnums=0)
    rng = np.random.default_rng(0)
    t = 40
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, t)), jnp.int32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    cache = cache_mod.init_cache(cfg, 1, 64)
    want, _ = fn(cfg, weights, cache, tokens, positions)
    got, _ = fn(cfg, placed, cache, tokens, positions)
    scale = float(jnp.max(jnp.abs(want)))
    tol = logit_tol(exact_kernels)
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= tol * scale, f"{form}: max |logit diff| {err:.3g} > {tol} x {scale:.3g}"
    # the HLO really calls the kernels
    hlo = fn.lower(cfg, placed, cache, tokens, positions).as_text()
    assert "jaxmoe_cpu_moe" in hlo and "jaxmoe_cpu_linear" in hlo


def test_store_from_checkpoint_without_loading_experts(tmp_path):
    """ExpertStore.from_checkpoint packs the experts from the mmap'd checkpoint; with
    load_checkpoint(load_experts=False) the placed model is the same as from full weights."""
    from jaxmoe.cpu.expert_store import ExpertStore

    cfg = ModelConfig.named("tiny")
    path = synthetic.write_synthetic_checkpoint(tmp_path / "ckpt", cfg, fmt="fp8", seed=5)
    cfg, full = loader.load_checkpoint(path)
    _, lean = loader.load_checkpoint(path, load_experts=False)
    store = ExpertStore.from_checkpoint(path)
    a, b = jcpu.to_cpu_placement(full), jcpu.to_cpu_placement(lean, store=store)
    try:
        x = np.random.default_rng(1).standard_normal((3, cfg.hidden_size)).astype(np.float32)
        ids = np.array([[0, 1], [2, 3], [7, 4]], np.int32)
        w = np.ones((3, 2), np.float32)
        for la, lb in zip(a.layers, b.layers):
            if isinstance(getattr(lb.mlp, "experts", None), HostExperts):
                sa = jcpu.host_matrix.live_owners[la.mlp.experts.store]
                np.testing.assert_array_equal(sa.moe(la.mlp.experts.layer, x, ids, w), store.moe(lb.mlp.experts.layer, x, ids, w))
    finally:
        jcpu.release(a)
        jcpu.release(b)


def test_decode_with_kv_b_on_host(tiny, exact_kernels):
    """With cfg, kv_b_proj becomes a HostKvB (per-head kernels through the model's absorb_q /
    absorb_out hooks); both attention forms still match the reference."""
    from jaxmoe.cpu.attention import HostKvB

    cfg, weights, _ = tiny
    placed = jcpu.to_cpu_placement(weights, cfg=cfg)
    try:
        assert all(isinstance(lw.self_attn.kv_b_proj, HostKvB) for lw in placed.layers)
        rng = np.random.default_rng(2)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, 33)), jnp.int32)
        positions = jnp.arange(33, dtype=jnp.int32)[None]
        cache = cache_mod.init_cache(cfg, 1, 64)
        for form in ("absorbed", "expanded"):
            fn = jax.jit(getattr(forward, f"forward_{form}"), static_argnums=0)
            want, _ = fn(cfg, weights, cache, tokens, positions)
            got, _ = fn(cfg, placed, cache, tokens, positions)
            tol = logit_tol(exact_kernels)
            err = float(jnp.max(jnp.abs(got - want)))
            assert err <= tol * float(jnp.max(jnp.abs(want))), f"{form}: max |logit diff| {err:.3g}"
        hlo = jax.jit(forward.forward_absorbed, static_argnums=0).lower(cfg, placed, cache, tokens, positions).as_text()
        assert "jaxmoe_cpu_linear_grouped" in hlo
    finally:
        jcpu.release(placed)
