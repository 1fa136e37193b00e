"""SLP / DSLP with `stream_dense=True`: each MoE layer's MLA, router and shared experts streamed
from their host copy with the layer's first expert unit instead of resident, on fake devices.

Tolerance: fp32 logits within atol = rtol = 1e-5 of `forward.forward_expanded` with every weight
resident, greedy tokens identical at every real position, latent caches equal to the same
tolerance. The 9-expert config of test_slp.py (48-token prompts, two rows, the second padded),
each layer in two parts; slp on one of the two devices, dslp on both with replicated and with
sequence-split attention. The log (plus a spy on the layer programs) shows each MoE layer's
dense transfer issued with its first unit, in the prefetch window, before its attention.
"""

import jax
import numpy as np
import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.loading.expert_source import CheckpointExperts
from jaxmoe.model.cache import init_cache
from jaxmoe.planning.planner import PrefillEstimate
from jaxmoe.streaming import sequence_split, slp
from jaxmoe.streaming.slp import place_dense, slp_prefill, slp_prefill_chunk
from tests.streaming.test_slp import MAX_LEN, REAL, T, _model

TOL = dict(atol=1e-5, rtol=1e-5)
CHUNK = 16


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    yield from _model(tmp_path_factory, "nine-dense", ModelConfig.named("tiny").replace(n_routed_experts=9, n_group=3,
                                                                                        topk_group=2))


@pytest.fixture
def log(monkeypatch):
    """The pipeline's log, with ("attention", layer, 0) when a layer program is dispatched."""
    events = []
    for cls in (slp._Replicated, sequence_split.SequenceSplit):
        layer = cls.layer

        def spy(self, cfg, lw, x, routed, cache, i, positions, _layer=layer):
            events.append(("attention", int(i), 0))
            return _layer(self, cfg, lw, x, routed, cache, i, positions)

        monkeypatch.setattr(cls, "layer", spy)
    return events


def check_equal(m, logits, cache):
    logits = np.asarray(logits)
    for row, n in enumerate(REAL):
        np.testing.assert_allclose(logits[row, :n], m["logits"][row, :n], **TOL)
        np.testing.assert_array_equal(logits[row, :n].argmax(-1), m["logits"][row, :n].argmax(-1))
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(m["cache"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def check_order(cfg, log, parts, buffers, n_chunks):
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    units = [(layer, p) for layer in moe for p in range(parts)]
    assert [e for e in log if e[0] == "dense"] == [("dense", layer, 0) for layer in moe] * n_chunks
    per_chunk = len(log) // n_chunks
    for c in range(n_chunks):
        chunk = log[c * per_chunk : (c + 1) * per_chunk]
        at = {e: i for i, e in enumerate(chunk)}
        for layer in moe:
            # the layer's dense part: issued with its first unit, before the layer's attention
            assert at[("dense", layer, 0)] + 1 == at[("transfer", layer, 0)]
            assert at[("dense", layer, 0)] < at[("attention", layer, 0)]
        for i, u in enumerate(units):  # the prefetch window holds: T(u + buffers - 1) before C(u) awaited
            if i + buffers - 1 < len(units):
                assert at[("transfer", *units[i + buffers - 1])] < at[("await", *u)]
        resident = 0
        for kind, *_ in chunk:
            resident += {"transfer": 1, "await": -1}.get(kind, 0)
            assert resident <= buffers
    # dense layers (first_k_dense_replace) stay resident: attention with no dense transfer
    assert all(("dense", i, 0) not in log for i in range(cfg.num_hidden_layers) if i not in moe)


@pytest.mark.parametrize("strategy, attention, pinned", [("slp", "replicated", None), ("dslp", "replicated", True),
                                                         ("dslp", "sequence", None)])
def test_stream_dense_equals_resident(nine, log, strategy, attention, pinned):
    """pinned=True: the dense weights (host jax arrays) staged through pinned_host memory, as the experts."""
    cfg, devs = nine["cfg"], jax.devices()[:2]
    logits, cache = slp_prefill(cfg, nine["dense"], CheckpointExperts(nine["ck"]), init_cache(cfg, 2, MAX_LEN),
                                nine["tokens"], nine["positions"], chunk_size=CHUNK, devices=devs, strategy=strategy,
                                parts_per_layer=2, attention=attention, stream_dense=True, pinned=pinned,
                                log=log)
    check_equal(nine, logits, cache)
    check_order(cfg, log, parts=2, buffers=2, n_chunks=T // CHUNK)


def test_the_estimate_carries_stream_dense(nine, log):
    """`slp_prefill_chunk` with a planner estimate (stream_dense, sequence-split dslp, 3 buffers)
    chunk by chunk, the dense weights placed once (MoE layers' left on the host side)."""
    cfg, devs = nine["cfg"], jax.devices()[:2]
    est = PrefillEstimate("dslp", T, 1.0, chunk_tokens=CHUNK, parts_per_layer=2, buffers=3, attention="sequence",
                          stream_dense=True)
    host = jax.device_get(nine["dense"])
    dense = place_dense(host, devs, est)
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert isinstance(dense.layers[moe[0]].self_attn.o_proj.weight, np.ndarray)  # the host copy, not placed
    assert dense.layers[0].self_attn.o_proj.weight.sharding.device_set == set(devs)  # a dense layer: resident
    cache, outs = init_cache(cfg, 2, MAX_LEN), []
    for s in range(0, T, CHUNK):
        logits, cache = slp_prefill_chunk(cfg, dense, nine["experts"], cache, nine["tokens"][:, s : s + CHUNK],
                                          nine["positions"][:, s : s + CHUNK], devices=jax.devices(), strategy=est,
                                          log=log)
        outs.append(logits)
    check_equal(nine, np.concatenate(outs, axis=1), cache)
    check_order(cfg, log, parts=2, buffers=3, n_chunks=T // CHUNK)
