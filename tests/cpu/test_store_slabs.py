"""The expert store's slabs (jm_store_pack / jm_store_slab) and their streaming views
(`cpu.tiled`): experts packed one after the other hold exactly the bytes a separately packed
matrix holds (the fused MoE gives bit-identical results either way), and un-tiling a slab view
on a device gives back the checkpoint's values and scales exactly."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxmoe import quant
from jaxmoe.cpu._lib import CpuExtError
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.host_matrix import HostMatrix
from jaxmoe.cpu.tiled import StoreExperts, TiledWeight
from jaxmoe.model.weights import ExpertsWeights
from jaxmoe.quant_int4 import Int4Weight

E, H, INTER = 3, 200, 70  # rows not a multiple of the 4-row tiles, columns not of 128


def _weights(rng, fmt):
    def one(n, k):
        w = rng.standard_normal((E, n, k)).astype(np.float32)
        if fmt == "bf16":
            return quant.DenseWeight(weight=w.astype(ml_dtypes.bfloat16))
        qs = [quant.quantize_fp8_blocks(w[e]) for e in range(E)]
        return quant.Fp8Weight(weight=np.stack([q for q, _ in qs]), weight_scale_inv=np.stack([s for _, s in qs]))

    return ExpertsWeights(one(INTER, H), one(INTER, H), one(H, INTER))


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_slab_views_untile_to_the_stored_values(fmt):
    ex = _weights(np.random.default_rng(0), fmt)
    with ExpertStore(2) as store:
        store.add_layer(1, ex.gate_proj, ex.up_proj, ex.down_proj)
        tiled = StoreExperts(store)(1)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w, t = getattr(ex, name), getattr(tiled, name)
            assert isinstance(t, TiledWeight) and t.shape == w.shape and t.data.shape[1] % 4096 == 0
            got = np.asarray(quant.dequantize(jax.device_put(t)))  # un-tiled by XLA
            np.testing.assert_array_equal(got, np.asarray(quant.dequantize(w)), err_msg=name)
            if fmt == "fp8":
                np.testing.assert_array_equal(t.scale, w.weight_scale_inv)
                assert t.data.base is not None  # a view of the store's memory, not a copy


@pytest.mark.parametrize("t", [5, 64])  # the GEMV items and the GEMM path
def test_slab_packed_store_runs_like_separate_matrices(t):
    rng = np.random.default_rng(1)
    ex = _weights(rng, "fp8")
    x = rng.standard_normal((t, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:2] for _ in range(t)]).astype(np.int32)
    gates = rng.random((t, 2)).astype(np.float32)
    with ExpertStore(1) as slabs, ExpertStore(1) as separate:
        slabs.add_layer(0, ex.gate_proj, ex.up_proj, ex.down_proj)
        separate.init_layer(0, E, H, INTER)
        for e in range(E):
            separate.set_expert(0, e, *[HostMatrix.fp8(w.weight[e], w.weight_scale_inv[e])
                                        for w in (ex.gate_proj, ex.up_proj, ex.down_proj)])
        assert separate.slab(0, 0) is None and slabs.slab(0, 0) is not None
        np.testing.assert_array_equal(slabs.moe(0, x, ids, gates), separate.moe(0, x, ids, gates))


def test_slab_rules_and_errors():
    rng = np.random.default_rng(2)
    ex = _weights(rng, "fp8")
    store = ExpertStore(3)
    store.add_layer(1, ex.gate_proj, ex.up_proj, ex.down_proj)
    assert StoreExperts.of((None, store.layer(1), None)) is not None
    # a projection handed over by set_expert leaves the slab: no streaming view of that layer
    store.set_expert(1, 2, *[HostMatrix.fp8(w.weight[0], w.weight_scale_inv[0])
                             for w in (ex.gate_proj, ex.up_proj, ex.down_proj)])
    assert store.slab(1, 0) is None and StoreExperts.of((None, store.layer(1))) is None
    with pytest.raises(ValueError, match="not packed in slabs"):
        StoreExperts(store)(1)
    # one format per slab, shapes checked, names in the messages
    with pytest.raises(CpuExtError, match="slab holds format"):
        store.pack(1, 0, 0, ex.gate_proj.weight[0].astype(np.float32).astype(ml_dtypes.bfloat16))
    with pytest.raises(CpuExtError, match="expert 7 out of range"):
        store.pack(1, 7, 0, ex.gate_proj.weight[0], ex.gate_proj.weight_scale_inv[0])
    with pytest.raises(CpuExtError, match="not initialised"):
        store.pack(0, 0, 0, ex.gate_proj.weight[0], ex.gate_proj.weight_scale_inv[0])
    # INT4 experts are matrices of their own
    w4 = Int4Weight.from_float(rng.standard_normal((E, INTER, H)).astype(np.float32))
    d4 = Int4Weight.from_float(rng.standard_normal((E, H, INTER)).astype(np.float32))
    store.add_layer(2, w4, w4, d4)
    assert store.slab(2, 0) is None
    source = StoreExperts(store)
    store.free()
    with pytest.raises(ValueError, match="freed"):
        source(1)
