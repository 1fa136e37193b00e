"""Stream-loading prefill (SLP) and SmallEP (DSLP) against the resident model, on fake devices.

Tolerance: fp32 logits within atol = rtol = 1e-4 of `forward.forward_expanded` with every weight
resident (they differ only by summation order: partial expert sums, the psum), greedy tokens
(argmax at every real position) identical, and the latent caches equal to the same tolerance.
Prompts of 48 tokens in chunks of 16 (three chunks, one compiled shape); two rows, the second
padded (positions = max_len, as the engine pads). SLP runs the tiny config on one device;
DSLP a 9-expert variant on two (9 is not divisible by 2). Each mesh x config compiles its
programs once: that is most of this file's time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.loading.expert_source import CheckpointExperts
from jaxmoe.loading.loader import load_checkpoint, open_checkpoint
from jaxmoe.loading.synthetic import write_synthetic_checkpoint
from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import forward_expanded
from jaxmoe.model.weights import split_experts
from jaxmoe.planning.planner import PrefillEstimate
from jaxmoe.streaming.expert_parallel import expert_windows
from jaxmoe.streaming.slp import place_dense, slp_prefill, slp_prefill_chunk

T, CHUNK, MAX_LEN, REAL = 48, 16, 64, (48, 40)
TOL = dict(atol=1e-4, rtol=1e-4)


def _model(tmp_path_factory, name, cfg):
    path = tmp_path_factory.mktemp(name) / "ckpt"
    write_synthetic_checkpoint(path, cfg, fmt="fp8", seed=0)
    cfg, weights = load_checkpoint(path)
    ck = open_checkpoint(path)
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, cfg.vocab_size, (2, T)).astype(np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    positions[1, REAL[1]:] = MAX_LEN  # padding: dropped by the cache, seen by nobody
    logits, cache = jax.jit(forward_expanded, static_argnums=0)(cfg, weights, init_cache(cfg, 2, MAX_LEN), tokens, positions)
    dense, experts = split_experts(weights)
    yield dict(cfg=cfg, dense=dense, experts=experts, ck=ck, tokens=tokens, positions=positions,
               logits=np.asarray(logits), cache=cache)
    ck.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from _model(tmp_path_factory, "tiny", ModelConfig.named("tiny"))


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """9 routed experts (3 groups of 3): not divisible by the 2 devices."""
    yield from _model(tmp_path_factory, "nine", ModelConfig.named("tiny").replace(n_routed_experts=9, n_group=3, topk_group=2))


def run(m, source, strategy, devices=2, **kw):
    log = []
    logits, cache = slp_prefill(m["cfg"], m["dense"], source, init_cache(m["cfg"], 2, MAX_LEN), m["tokens"],
                                m["positions"], chunk_size=CHUNK, devices=jax.devices()[:devices],
                                strategy=strategy, log=log, **kw)
    return np.asarray(logits), cache, log


def check_equal(m, logits, cache):
    for row, n in enumerate(REAL):
        np.testing.assert_allclose(logits[row, :n], m["logits"][row, :n], **TOL)
        np.testing.assert_array_equal(logits[row, :n].argmax(-1), m["logits"][row, :n].argmax(-1))
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(m["cache"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.fixture(scope="module")
def slp_run(tiny):
    """SLP on one device, experts streamed from zero-copy views of the checkpoint's mmap,
    each layer in two parts."""
    return run(tiny, CheckpointExperts(tiny["ck"]), "slp", devices=1, parts_per_layer=2)


def test_slp_equals_resident(tiny, slp_run):
    check_equal(tiny, *slp_run[:2])


def test_dslp_uneven_experts(nine):
    # windows [0, 5) and [4, 9), owned [0, 5) and [5, 9); the planner's estimate as the strategy
    assert [(w.offset, w.lo, w.hi) for w in expert_windows(9, 2)[1]] == [(0, 0, 5), (4, 5, 9)]
    est = PrefillEstimate("dslp", T, 1.0, chunk_tokens=CHUNK, parts_per_layer=1)
    logits, cache, _ = run(nine, CheckpointExperts(nine["ck"]), est)
    check_equal(nine, logits, cache)
    assert jax.tree.leaves(cache)[0].sharding.device_set == set(jax.devices()[:2])


def test_dslp_uneven_experts_in_parts_and_pinned_staging(nine):
    # 4 windows of 3 for 9 experts: the last owns nothing; experts from host jax arrays, staged
    # through pinned_host memory
    assert [(w.offset, w.lo, w.hi) for w in expert_windows(9, 4)[1]][-1] == (6, 9, 9)
    check_equal(nine, *run(nine, nine["experts"], "dslp", parts_per_layer=2, pinned=True)[:2])


def test_dslp_from_the_expert_store_slabs(nine):
    """The host copy decode reads (cpu_ext's packed tiles in the store's slabs) streamed as is
    and un-tiled on the devices: the same logits as streaming the checkpoint's FP8 tensors."""
    from jaxmoe.cpu.expert_store import ExpertStore
    from jaxmoe.cpu.tiled import StoreExperts

    with ExpertStore.from_checkpoint(nine["ck"]) as store:
        source = StoreExperts(store)
        assert source(1).gate_proj.shape == (9, *np.shape(nine["experts"][1].gate_proj.weight)[1:])
        logits, cache, _ = run(nine, source, "dslp", parts_per_layer=2)
    check_equal(nine, logits, cache)
    want, _, _ = run(nine, CheckpointExperts(nine["ck"]), "dslp", parts_per_layer=2)
    np.testing.assert_array_equal(logits, want)


def _check_order(log, units, buffers):
    """Per chunk: every unit transferred once, computed after its transfer, awaited after its
    compute; T(u + buffers - 1) issued before C(u) is awaited; never more than `buffers` units
    resident (transferred and not yet awaited)."""
    per_chunk = 3 * len(units)
    assert [e for e in log if e[0] == "transfer"] == [("transfer", *u) for u in units] * (T // CHUNK)
    for c in range(T // CHUNK):
        chunk = log[c * per_chunk : (c + 1) * per_chunk]
        at = {e: i for i, e in enumerate(chunk)}
        for i, u in enumerate(units):
            assert at[("transfer", *u)] < at[("compute", *u)] < at[("await", *u)]
            ahead = units[i + buffers - 1] if i + buffers - 1 < len(units) else None
            if ahead is not None:
                assert at[("transfer", *ahead)] < at[("await", *u)], f"unit {ahead} not prefetched before {u} awaited"
        resident = 0
        for kind, *_ in chunk:
            resident += {"transfer": 1, "await": -1}.get(kind, 0)
            assert resident <= buffers


def test_prefetch_overlaps_double_buffered(tiny, slp_run):
    units = [(layer, part) for layer in (1, 2) for part in (0, 1)]
    _check_order(slp_run[2], units, buffers=2)


def test_prefetch_runs_further_ahead_with_more_buffers(tiny):
    logits, cache, log = run(tiny, CheckpointExperts(tiny["ck"]), "slp", devices=1, parts_per_layer=2, buffers=3)
    check_equal(tiny, logits, cache)
    _check_order(log, [(layer, part) for layer in (1, 2) for part in (0, 1)], buffers=3)


def test_engine_hook_one_chunk_with_logit_index(tiny, slp_run):
    cfg, idx = tiny["cfg"], np.array([CHUNK - 1, 5])
    dense = place_dense(tiny["dense"], jax.devices()[:1], "slp")
    logits, cache = slp_prefill_chunk(cfg, dense, CheckpointExperts(tiny["ck"]), init_cache(cfg, 2, MAX_LEN),
                                      tiny["tokens"][:, :CHUNK], tiny["positions"][:, :CHUNK], devices=jax.devices(),
                                      strategy="slp", parts_per_layer=2, logit_index=idx)
    assert logits.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], slp_run[0][[0, 1], idx], **TOL)
    # a whole prompt with one logit row per sequence, in different chunks
    idx = np.array([T - 1, CHUNK + 4])
    logits, _, _ = run(tiny, CheckpointExperts(tiny["ck"]), "slp", devices=1, parts_per_layer=2, logit_index=idx)
    np.testing.assert_allclose(logits[:, 0], slp_run[0][[0, 1], idx], **TOL)


def test_errors(tiny, slp_run):
    cfg = tiny["cfg"]
    with pytest.raises(ValueError, match="needs 2 device"):
        run(tiny, tiny["experts"], "dslp", devices=1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        run(tiny, tiny["experts"], "cpu")
    with pytest.raises(ValueError, match="no routed experts"):
        run(tiny, [None] * cfg.num_hidden_layers, "slp", devices=1, parts_per_layer=2)
    assert jnp.isfinite(jnp.asarray(slp_run[0])).all()
