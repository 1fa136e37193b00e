"""INT4 routed experts for the families beside DeepSeek-V3 (issue 15), each test once per family
(conftest's `TINY`): `jaxmoe convert --to int4` on a Qwen3-MoE / GLM-4.5 checkpoint (the CLI
opens it with its family's accounting) writes every routed expert as qweight + scales, quantized
from the FP8 values, and copies every other tensor byte for byte; the family's loader accounts
the converted directory and loads its experts as `Int4Weight`; on the CPU kernels (INT4 matrices
of the expert store, exact precision) the greedy tokens equal the pure-JAX path's on the same
converted checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import jaxmoe
from jaxmoe import quant, quant_int4
from jaxmoe.cli import main
from jaxmoe.cpu.handles import HostExperts
from jaxmoe.loading.convert import expert_float
from jaxmoe.model.weights import MLPWeights
from tests.models.test_family_engine import NEW, solo_greedy

GROUP = 32


@pytest.fixture(scope="module")
def int4_ckpt(tiny_ckpts, tiny_name, tmp_path_factory):
    dst = tmp_path_factory.mktemp(f"{tiny_name}-int4") / "ckpt"
    assert main(["convert", "--to", "int4", "--group", str(GROUP), "--workers", "2", str(tiny_ckpts["fp8"]), str(dst)]) == 0
    return dst


def _moe_layers(cfg):
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def test_converted_checkpoint_holds_int4_experts_and_the_rest_as_it_was(tiny_ckpts, int4_ckpt, tiny_family, tiny_cfg):
    src_dir = tiny_ckpts["fp8"]
    with tiny_family.open_checkpoint(src_dir) as src, tiny_family.open_checkpoint(int4_ckpt) as dst:
        assert src.int4_group is None and dst.int4_group == GROUP and dst.cfg.n_routed_experts == src.cfg.n_routed_experts > 0
        layer = _moe_layers(tiny_cfg)[-1]
        views = dst.expert_arrays(layer)
        assert sorted(views) == ["down_proj", "down_proj_scales", "gate_proj", "gate_proj_scales", "up_proj",
                                 "up_proj_scales"]
        assert all(len(v) == dst.cfg.n_routed_experts for v in views.values())
        for proj, specs in src.expert_tensors(src.cfg, layer).items():
            for e in (0, dst.cfg.n_routed_experts - 1):
                name = specs[e].name
                assert name not in dst.store and specs[e].scale_name not in dst.store
                q, s = quant_int4.quantize_int4(expert_float(src, name), GROUP, name)
                np.testing.assert_array_equal(views[proj][e], q)
                np.testing.assert_array_equal(views[f"{proj}_scales"][e], s)
        n_other = 0
        for name in src.store.tensors:
            spec = src.specs.get(name) or src.specs.get(name.removesuffix("_scale_inv"))
            if spec is not None and spec.expert is not None:
                continue
            a, b = src.array(name), dst.array(name)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
            n_other += 1
        assert n_other > 10


def test_loads_as_int4_weights_close_to_the_fp8_experts(tiny_ckpts, int4_ckpt, tiny_family):
    cfg, w = tiny_family.load_checkpoint(int4_ckpt)
    _, ref = tiny_family.load_checkpoint(tiny_ckpts["fp8"])
    n = 0
    for lw, rw in zip(w.layers, ref.layers):
        if isinstance(lw.mlp, MLPWeights):
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got, want = getattr(lw.mlp.experts, proj), getattr(rw.mlp.experts, proj)
            assert isinstance(got, quant_int4.Int4Weight) and got.group == GROUP
            a, b = np.asarray(quant.dequantize(got)), np.asarray(quant.dequantize(want))
            assert a.shape == b.shape
            # 16 levels per group of 32 on Gaussian weights: a few percent of error, never a wrong tensor
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.15, proj
            n += 1
    assert n == 3 * len(_moe_layers(cfg))


def test_int4_on_the_kernels_gives_the_pure_jax_tokens(int4_ckpt, tiny_family):
    ids = list(range(5, 40))
    want = solo_greedy(*tiny_family.load_checkpoint(int4_ckpt), ids, NEW)
    m = jaxmoe.load(int4_ckpt, cpu_kernels=True, cpu_precision="exact", n_slots=2, chunk_size=16, kv_block_size=16)
    try:
        experts = [lw.mlp.experts for lw in m.weights.layers if not isinstance(lw.mlp, MLPWeights)]
        assert experts and all(isinstance(ex, HostExperts) for ex in experts)
        assert jaxmoe.generate(m, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == want
    finally:
        m.close()

