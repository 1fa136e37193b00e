"""DSLP with sequence-split attention for the grouped-query-attention families (the family's
`split_layer`: `layers.gqa_decoder.split_layer`), on fake devices, once per family (conftest's
TINY), against the family's own forward with every weight resident and a contiguous cache.

As tests/streaming/test_sequence_split.py for DeepSeek-V3: fp32 logits within atol = rtol =
1e-5, greedy tokens identical at every real position, the caches (keys in `c_kv`, values in
`k_pe`) equal to the same tolerance and replicated on the mesh. Two rows of 48 tokens (the
second padded from 40, as the engine pads), in chunks the devices do not divide (15 on 2
devices: 15 + 15 + 15 + 3; 13 on 4: 13 + 13 + 13 + 9), each MoE layer streamed in two parts.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmoe.model.weights import split_experts
from jaxmoe.models import glm4_moe, qwen3_moe
from jaxmoe.streaming.slp import SlpPipeline
from tests.streaming.test_sequence_split import check_equal, layer_calls  # noqa: F401 (layer_calls: a fixture)
from tests.streaming.test_slp import MAX_LEN, REAL, T

PACKAGES = {qwen3_moe.Qwen3MoeConfig: qwen3_moe, glm4_moe.Glm4MoeConfig: glm4_moe}


@pytest.fixture(scope="module")
def resident(tiny_model):
    """The prompt rows, the family forward's logits and cache, and the split weights."""
    cfg, w = tiny_model.cfg, tiny_model.weights
    package = PACKAGES[type(cfg)]
    rng = np.random.RandomState(5)
    tokens = rng.randint(0, cfg.vocab_size, (2, T)).astype(np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    positions[1, REAL[1]:] = MAX_LEN  # padding: dropped by the cache, seen by nobody
    logits, cache = jax.jit(package.forward, static_argnums=0)(cfg, w, package.init_cache(cfg, 2, MAX_LEN), tokens,
                                                               positions)
    dense, experts = split_experts(w)
    return dict(cfg=cfg, package=package, dense=dense, experts=experts, tokens=tokens, positions=positions,
                logits=np.asarray(logits), cache=cache)


@pytest.mark.parametrize("n_dev,chunk", [(2, 15), (4, 13)])
def test_sequence_split_equals_the_resident_forward(resident, tiny_family, layer_calls, n_dev, chunk):  # noqa: F811
    """The pipeline on an n-device expert mesh (DSLP's is 2; 4: the same programs, the chunk split in 4)."""
    m, devs = resident, jax.devices()[:n_dev]
    cfg = m["cfg"]
    run = SlpPipeline(cfg, devs, parts_per_layer=2, attention="sequence", family=tiny_family)
    dense, cache, outs = run.place(m["dense"]), m["package"].init_cache(cfg, 2, MAX_LEN), []
    for s in range(0, T, chunk):
        out, cache = run(dense, m["experts"], cache, m["tokens"][:, s : s + chunk], m["positions"][:, s : s + chunk])
        outs.append(np.asarray(out))
    check_equal(m, np.concatenate(outs, axis=1), cache, devs)
    assert layer_calls == [n_dev] * (-(-T // chunk) * cfg.num_hidden_layers)  # every chunk, every layer split
