"""DSLP with sequence-split attention (`attention="sequence"`, streaming/sequence_split.py)
against the resident model, on fake devices.

Tolerance: fp32 logits within atol = rtol = 1e-5 of `forward.forward_expanded` with every weight
resident, greedy tokens identical at every real position, latent caches equal to the same
tolerance and replicated on the mesh. The 9-expert config of test_slp.py (not divisible by the
devices), prompts of 48 tokens (two rows, the second padded), in chunks the devices do not
divide (15 = 15 + 15 + 15 + 3 on 2 devices; 13 = 13 + 13 + 13 + 9 on 4), each layer in two
parts. DSLP's mesh is 2 devices; the 4-device runs build the pipeline on a 4-device expert mesh
directly (SmallEP over 4 windows, the chunk split in 4): the same programs, a wider mesh.
"""

import jax
import numpy as np
import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.loading.expert_source import CheckpointExperts
from jaxmoe.model.cache import init_cache
from jaxmoe.planning.planner import PrefillEstimate
from jaxmoe.streaming import sequence_split
from jaxmoe.streaming.slp import SlpPipeline, place_dense, slp_prefill, slp_prefill_chunk
from tests.streaming.test_slp import MAX_LEN, REAL, T, _model

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    yield from _model(tmp_path_factory, "nine-seq", ModelConfig.named("tiny").replace(n_routed_experts=9, n_group=3,
                                                                                      topk_group=2))


def check_equal(m, logits, cache, devices):
    logits = np.asarray(logits)
    for row, n in enumerate(REAL):
        np.testing.assert_allclose(logits[row, :n], m["logits"][row, :n], **TOL)
        np.testing.assert_array_equal(logits[row, :n].argmax(-1), m["logits"][row, :n].argmax(-1))
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(m["cache"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
        assert got.sharding.device_set == set(devices) and got.sharding.is_fully_replicated


@pytest.fixture
def layer_calls(monkeypatch):
    """How many layer programs ran split by sequence."""
    calls = []
    layer = sequence_split.SequenceSplit.layer

    def spy(self, *a):
        calls.append(self.n)
        return layer(self, *a)

    monkeypatch.setattr(sequence_split.SequenceSplit, "layer", spy)
    return calls


def test_dslp_sequence_split_odd_chunks_in_parts(nine, layer_calls):
    devs = jax.devices()[:2]
    logits, cache = slp_prefill(nine["cfg"], nine["dense"], CheckpointExperts(nine["ck"]), init_cache(nine["cfg"], 2, MAX_LEN),
                                nine["tokens"], nine["positions"], chunk_size=15, devices=devs, strategy="dslp",
                                parts_per_layer=2, attention="sequence")
    assert logits.shape == (2, T, nine["cfg"].vocab_size)
    check_equal(nine, logits, cache, devs)
    assert layer_calls == [2] * (4 * nine["cfg"].num_hidden_layers)  # 4 chunks, every layer split


def test_four_devices(nine):
    """The pipeline on a 4-device mesh: the chunk split in 4 (13 and 9 tokens: padded to 16, 12)."""
    cfg, devs = nine["cfg"], jax.devices()[:4]
    run = SlpPipeline(cfg, devs, parts_per_layer=2, attention="sequence")
    dense = run.place(nine["dense"])
    cache, outs = init_cache(cfg, 2, MAX_LEN), []
    for s in range(0, T, 13):
        logits, cache = run(dense, nine["experts"], cache, nine["tokens"][:, s : s + 13], nine["positions"][:, s : s + 13])
        outs.append(logits)
    check_equal(nine, np.concatenate(outs, axis=1), cache, devs)


def test_the_estimate_carries_the_attention(nine, layer_calls):
    """A planner estimate with attention="sequence" as the strategy (the engine's hook), one
    odd chunk with a logit index: the rows of the resident model's logits."""
    cfg, devs, n = nine["cfg"], jax.devices()[:2], 15
    est = PrefillEstimate("dslp", T, 1.0, chunk_tokens=n, parts_per_layer=2, attention="sequence")
    idx = np.array([n - 1, 6])
    logits, cache = slp_prefill_chunk(cfg, place_dense(nine["dense"], devs, est), nine["experts"], init_cache(cfg, 2, MAX_LEN),
                                      nine["tokens"][:, :n], nine["positions"][:, :n], devices=jax.devices(),
                                      strategy=est, logit_index=idx)
    assert logits.shape == (2, 1, cfg.vocab_size) and layer_calls
    # the first chunk's rows do not see later tokens: the whole prompt's reference rows
    np.testing.assert_allclose(np.asarray(logits)[:, 0], nine["logits"][[0, 1], idx], **TOL)
    assert cache.c_kv.sharding.device_set == set(devs)


def test_unknown_attention_is_an_error(nine):
    with pytest.raises(ValueError, match="attention must be one of"):
        SlpPipeline(nine["cfg"], jax.devices()[:2], attention="heads")
