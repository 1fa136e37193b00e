"""The families beside DeepSeek-V3 on jaxmoe's CPU kernels (issue 15), each test once per family
(conftest's `TINY`): `jaxmoe.load(cpu_kernels=True)` puts every FP8 / bf16 Linear (GQA's
q/k/v/o_proj, dense MLPs, GLM's shared experts, lm_head) on `HostLinear`s and the routed experts in
an `ExpertStore` (`HostExperts`); with exact precision the greedy tokens equal the pure JAX path's
on the same checkpoint; continuous batching, prefix caching and the weights cache run on them; the
routers' padding (expert id -1, weight 0) runs no expert on the fused MoE kernel."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe.cpu.handles import HostExperts, HostLinear
from jaxmoe.model.moe import routed_experts
from jaxmoe.model.weights import MLPWeights
from jaxmoe.models.registry import read_config
from jaxmoe.serving.engine import Engine
from tests.models.conftest import one_family
from tests.models.test_family_engine import BS, NEW, prompts, solo_greedy

FMTS = ("fp8", "bf16")


def _forward_module(cfg):
    return importlib.import_module(type(cfg).__module__.rsplit(".", 1)[0] + ".forward")


def _pure_weights(path, family):
    return family.load_checkpoint(path)[1]


def _moe_blocks(weights):
    return [(i, lw.mlp) for i, lw in enumerate(weights.layers) if not isinstance(lw.mlp, MLPWeights)]


@pytest.mark.parametrize("fmt", FMTS)
def test_the_placed_weights_are_host_handles(tiny_kernel_models, tiny_cfg, fmt):
    """Not silently the JAX path: every Linear of the placed pytree is a HostLinear, every MoE
    layer's experts a HostExperts layer; biases, norms and routers stay arrays."""
    m = tiny_kernel_models[fmt]
    assert m.cpu_kernels and isinstance(m.cfg, type(tiny_cfg))
    w = m.weights
    assert isinstance(w.lm_head, HostLinear) and isinstance(w.embed_tokens, jax.Array)
    n_moe = 0
    for i, lw in enumerate(w.layers):
        a = lw.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(a, name), HostLinear), (i, name)
        for f in dataclasses.fields(a):  # q/k norms, biases
            v = getattr(a, f.name)
            assert v is None or isinstance(v, (HostLinear, jax.Array)), (i, f.name)
        if isinstance(lw.mlp, MLPWeights):
            assert not tiny_cfg.is_moe_layer(i)
            assert all(isinstance(getattr(lw.mlp, p), HostLinear) for p in ("gate_proj", "up_proj", "down_proj"))
            continue
        n_moe += 1
        ex = lw.mlp.experts
        assert isinstance(ex, HostExperts) and ex.layer == i
        assert (ex.n_experts, ex.hidden, ex.inter) == (
            tiny_cfg.n_routed_experts, tiny_cfg.hidden_size,
            tiny_cfg.moe_intermediate_size)
        assert isinstance(lw.mlp.gate.weight, jax.Array)
        shared = getattr(lw.mlp, "shared_experts", None)  # GLM-4.5's
        if shared is not None:
            assert all(isinstance(getattr(shared, p), HostLinear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert n_moe == sum(tiny_cfg.is_moe_layer(i) for i in range(tiny_cfg.num_hidden_layers)) > 0


@pytest.mark.parametrize("fmt", FMTS)
def test_greedy_tokens_equal_the_pure_jax_path(tiny_kernel_models, tiny_ckpts, tiny_family, fmt):
    """Same checkpoint, exact kernels vs XLA: the same greedy tokens, over a prompt of several
    chunks and a decode."""
    m = tiny_kernel_models[fmt]
    ids = m.encode_prompt("The quick brown fox jumps over the lazy dog, again and again and again.")
    assert len(ids) > BS
    got = jaxmoe.generate(m, ids, max_new_tokens=12, ignore_eos=True).token_ids
    assert got == solo_greedy(m.cfg, _pure_weights(tiny_ckpts[fmt], tiny_family), ids, 12)


def test_load_default_turns_the_kernels_on_where_jax_runs_on_the_cpu(tiny_ckpts, tiny_family):
    assert jax.default_backend() == "cpu"
    m = jaxmoe.load(tiny_ckpts["bf16"])  # cpu_kernels=None
    try:
        assert m.cpu_kernels and isinstance(m.weights.layers[0].self_attn.q_proj, HostLinear)
    finally:
        m.close()
    assert not jaxmoe.load(tiny_ckpts["bf16"], cpu_kernels=False).cpu_kernels


@one_family("glm4-moe-tiny")
def test_concurrent_requests_on_the_kernels_get_their_solo_tokens(tiny_kernel_models):
    """Three requests in one engine's steps (chunked prefill beside decode rows, padded row
    buckets) get what each gets alone (the plain loop over the same placed weights)."""
    m = tiny_kernel_models["fp8"]
    cfg, w = m.cfg, m.weights
    ps = prompts(cfg.vocab_size, (37, 21, 50))
    solo = [solo_greedy(cfg, w, p, NEW) for p in ps]
    e = m.engine
    assert e.n_slots == 3 and e.chunk_size == BS
    reqs = [e.submit(p, NEW, background=False) for p in ps]
    assert e.step()
    assert sorted(r.slot for r in reqs) == [0, 1, 2]  # all three admitted at once
    e.run_until_idle()
    assert [r.output_ids for r in reqs] == solo


@one_family("qwen3-moe-tiny")
def test_prefix_cache_on_the_kernels(tiny_kernel_models):
    m = tiny_kernel_models["bf16"]
    cfg, w = m.cfg, m.weights
    system, x, y = prompts(cfg.vocab_size, (2 * BS + 5, 9, 13), seed=5)
    e = Engine(cfg, w, "cpu-only", n_slots=2, max_len=128, chunk_size=BS, kv_block_size=BS)
    first = e.submit(system + x, NEW, background=False)
    e.run_until_idle()
    second = e.submit(system + y, NEW, background=False)
    e.run_until_idle()
    assert first.cached_tokens == 0 and second.cached_tokens == 2 * BS
    assert first.output_ids == solo_greedy(cfg, w, system + x, NEW)
    assert second.output_ids == solo_greedy(cfg, w, system + y, NEW)


@pytest.mark.parametrize("fmt", FMTS)
def test_router_padding_runs_no_expert_on_the_kernels(tiny_kernel_models, tiny_ckpts, tiny_family, tiny_cfg, fmt):
    """The family's MoE block with padding tokens (valid False: the router gives them expert id
    -1 and weight 0): the fused MoE kernel equals the JAX reference, and an id -1 runs nothing."""
    sparse_moe = _forward_module(tiny_cfg).sparse_moe
    placed = dict(_moe_blocks(tiny_kernel_models[fmt].weights))
    pure = dict(_moe_blocks(_pure_weights(tiny_ckpts[fmt], tiny_family)))
    x = jnp.asarray(np.random.RandomState(0).randn(6, tiny_cfg.hidden_size).astype(np.float32))
    valid = jnp.asarray([True, False, True, True, False, True])
    for i, block in placed.items():
        got = np.asarray(jax.jit(sparse_moe, static_argnums=0)(tiny_cfg, block, x, valid))
        want = np.asarray(sparse_moe(tiny_cfg, pure[i], x, valid))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
        k = 2
        ids = jnp.asarray([[0, 1], [-1, -1], [3, -1], [-1, 2], [-1, -1], [1, 0]], jnp.int32)
        wts = jnp.where(ids < 0, 0.0, 0.5).astype(jnp.float32)
        out = np.asarray(routed_experts(block.experts, x, ids, wts))
        assert out.shape == (6, tiny_cfg.hidden_size) and ids.shape[1] == k
        assert not out[[1, 4]].any() and out[[0, 2, 3, 5]].any()
        np.testing.assert_allclose(out, np.asarray(routed_experts(pure[i].experts, x, ids, wts)), rtol=2e-4, atol=2e-5)


@one_family("qwen3-moe-tiny")
def test_the_weights_cache_maps_the_second_load(tiny_ckpts, tiny_family, tmp_path, caplog):
    """weights_cache=: the first load packs and writes the store and host matrices, the second
    maps them (and reads the rest with the family's own loader); same tokens as the pure JAX path."""
    path, ids = tiny_ckpts["fp8"], list(range(5, 30))
    want = solo_greedy(read_config(path), _pure_weights(path, tiny_family), ids, NEW)
    caplog.set_level(logging.INFO, logger="jaxmoe.cpu.weights_cache")
    for expect in ("wrote", "mapped"):
        caplog.clear()
        m = jaxmoe.load(path, cpu_kernels=True, cpu_precision="exact", weights_cache=tmp_path / "wc")
        try:
            assert any(f"weights cache: {expect}" in r.getMessage() for r in caplog.records), expect
            assert isinstance(m.weights.lm_head, HostLinear)
            assert jaxmoe.generate(m, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == want
        finally:
            m.close()
