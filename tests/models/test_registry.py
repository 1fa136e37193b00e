"""The family registry: dispatch by model_type / architectures / config type, the error for an
unsupported architecture, the cache widths and bytes per family, the synthetic writer through
`jaxmoe synth`, and what `jaxmoe.load` refuses for a family without the CPU kernels (the tests
taking conftest's `tiny_*` fixtures run once per family: Qwen3-MoE, GLM-4.5)."""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from jaxmoe.cli import main
from jaxmoe.config import ConfigError, ModelConfig, named_config_path
from jaxmoe.loading.loader import load_checkpoint
from jaxmoe.loading.safetensors_index import CheckpointError, SafetensorsCheckpoint
from jaxmoe.model.cache import init_cache, init_paged_cache
from jaxmoe.models.glm4_moe import Glm4MoeConfig
from jaxmoe.models.qwen3_moe import Qwen3MoeConfig
from jaxmoe.models.registry import DEEPSEEK_V3, GLM4_MOE, QWEN3_MOE, cache_bytes_per_position, family_of, read_config
from jaxmoe.serving.engine import cache_bytes_per_position as engine_bytes


def _packaged(name: str) -> dict:
    return json.loads(named_config_path("models", name, "model config").read_text())


@pytest.mark.parametrize(("name", "family"), [("tiny", DEEPSEEK_V3), ("deepseek-v3", DEEPSEEK_V3), ("kimi-k2", DEEPSEEK_V3),
                                              ("kimi-k2-tiny", DEEPSEEK_V3), ("qwen3-moe-tiny", QWEN3_MOE),
                                              ("qwen3-30b-a3b", QWEN3_MOE), ("qwen3-235b-a22b", QWEN3_MOE),
                                              ("qwen3-moe-mid", QWEN3_MOE),
                                              ("glm4-moe-tiny", GLM4_MOE), ("glm-4.5", GLM4_MOE), ("glm-4.5-air", GLM4_MOE)])
def test_packaged_configs_find_their_family(name, family):
    d = _packaged(name)
    assert family_of(d) is family
    cfg = read_config(name)
    assert isinstance(cfg, family.config_type) and family_of(cfg) is family


def test_kimi_k2_model_type_is_deepseek_v3():
    d = _packaged("kimi-k2")
    assert d["model_type"] == "kimi_k2"
    assert family_of({"model_type": "kimi_k2"}) is DEEPSEEK_V3
    cfg = read_config("kimi-k2")
    assert isinstance(cfg, ModelConfig) and cfg.n_routed_experts == 384 and cfg.n_group == 1


def test_dispatch_by_architectures_alone_and_the_legacy_default():
    assert family_of({"architectures": ["Qwen3MoeForCausalLM"]}) is QWEN3_MOE
    assert family_of({"architectures": ["DeepseekV3ForCausalLM"]}) is DEEPSEEK_V3
    assert family_of({"architectures": ["Glm4MoeForCausalLM"]}) is GLM4_MOE
    assert family_of({"model_type": "glm4_moe"}) is GLM4_MOE
    assert family_of({}) is DEEPSEEK_V3  # a config naming no architecture: what jaxmoe wrote before the registry


@pytest.mark.parametrize("d", [{"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                               {"architectures": ["MixtralForCausalLM"]},
                               {"model_type": "glm4", "architectures": ["Glm4ForCausalLM"]}])  # dense GLM-4: not GLM-4.5
def test_unknown_architecture_names_the_supported_ones(d):
    with pytest.raises(ConfigError, match="unsupported architecture") as e:
        family_of(d)
    for word in ("deepseek_v3", "kimi_k2", "qwen3_moe", "glm4_moe", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM",
                 "Glm4MoeForCausalLM", "GLM-4.5"):
        assert word in str(e.value)
    with pytest.raises(ConfigError, match="config of no supported model family"):
        family_of(object())


def test_unknown_architecture_through_load_and_synth(tmp_path, capsys):
    d = _packaged("qwen3-moe-tiny") | {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="unsupported architecture.*supported: DeepSeek-V3"):
        jaxmoe.load(tmp_path / "ckpt")
    (tmp_path / "mixtral.json").write_text(json.dumps(d))
    assert main(["synth", "--config", str(tmp_path / "mixtral.json"), "--out", str(tmp_path / "out")]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_another_familys_config_is_not_read_as_deepseek(tiny_name, tiny_ckpts):
    """The DeepSeek-V3 parser names the family mismatch, not a missing MLA key."""
    d = _packaged(tiny_name)
    with pytest.raises(ConfigError, match="not of the DeepSeek-V3 family") as e:
        ModelConfig.from_dict(d)
    assert "kv_lora_rank" not in str(e.value)
    with pytest.raises(CheckpointError, match="not of the DeepSeek-V3 family"):
        load_checkpoint(tiny_ckpts["bf16"])


def test_cache_widths_and_bytes_per_family():
    ds = ModelConfig.named("tiny")
    assert DEEPSEEK_V3.cache_widths(ds) == (ds.kv_lora_rank, ds.qk_rope_head_dim)
    per_pos = ds.num_hidden_layers * (ds.kv_lora_rank + ds.qk_rope_head_dim) * 4
    assert cache_bytes_per_position(ds) == engine_bytes(ds) == per_pos
    assert engine_bytes(ds, jnp.bfloat16) == per_pos // 2
    qwen3_cfg, glm_cfg = Qwen3MoeConfig.named("qwen3-moe-tiny"), Glm4MoeConfig.named("glm4-moe-tiny")
    kv = qwen3_cfg.num_key_value_heads * qwen3_cfg.head_dim
    assert QWEN3_MOE.cache_widths(qwen3_cfg) == (kv, kv) == (80, 80)
    assert engine_bytes(qwen3_cfg) == qwen3_cfg.num_hidden_layers * 2 * kv * 4
    glm_kv = glm_cfg.num_key_value_heads * glm_cfg.head_dim
    assert GLM4_MOE.cache_widths(glm_cfg) == (glm_kv, glm_kv) == (80, 80)
    assert cache_bytes_per_position(glm_cfg) == engine_bytes(glm_cfg) == glm_cfg.num_hidden_layers * 2 * glm_kv * 4
    assert engine_bytes(glm_cfg, jnp.bfloat16) == glm_cfg.num_hidden_layers * 2 * glm_kv * 2
    big = Glm4MoeConfig.named("glm-4.5")  # 8 KV heads of 128: keys and values 1024 numbers each per layer
    assert GLM4_MOE.cache_widths(big) == (1024, 1024) and cache_bytes_per_position(big, jnp.bfloat16) == 92 * 2048 * 2
    # the pools: DeepSeek's default widths unchanged, explicit widths for another layout
    assert init_paged_cache(ds, 3, 16, 64).c_kv.shape == (ds.num_hidden_layers, 3, 16, ds.kv_lora_rank)
    assert init_paged_cache(ds, 3, 16, 64).k_pe.shape == (ds.num_hidden_layers, 3, 16, ds.qk_rope_head_dim)
    pool = init_paged_cache(qwen3_cfg, 3, 16, 64, widths=(kv, kv))
    assert pool.c_kv.shape == pool.k_pe.shape == (4, 3, 16, kv) and pool.max_len == 64
    assert init_cache(qwen3_cfg, 2, 32, widths=(kv, kv + 1)).k_pe.shape == (4, 2, 32, kv + 1)


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_synth_cli_writes_a_checkpoint_that_loads(tmp_path, fmt, tiny_name, tiny_cfg, tiny_family):
    out = tmp_path / f"q-{fmt}"
    assert main(["synth", "--config", tiny_name, "--out", str(out), "--fmt", fmt]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    d = json.loads((out / "config.json").read_text())
    assert d["model_type"] == tiny_family.model_types[0] and ("quantization_config" in d) == (fmt == "fp8")
    # qwen3-moe-tiny: layer 0 sparse, mlp_only layer 2 dense; glm4-moe-tiny: first_k_dense_replace 1
    moe = next(i for i in range(tiny_cfg.num_hidden_layers) if tiny_cfg.is_moe_layer(i))
    dense = next(i for i in range(tiny_cfg.num_hidden_layers) if not tiny_cfg.is_moe_layer(i))
    st = SafetensorsCheckpoint(out)
    try:
        q = st.array("model.layers.0.self_attn.q_proj.weight")
        expert = st.array(f"model.layers.{moe}.mlp.experts.3.down_proj.weight")
        assert q.dtype == expert.dtype == (np.dtype(ml_dtypes.float8_e4m3fn) if fmt == "fp8" else np.dtype(ml_dtypes.bfloat16))
        assert ("model.layers.0.self_attn.q_proj.weight_scale_inv" in st) == (fmt == "fp8")
        assert f"model.layers.{dense}.mlp.gate_proj.weight" in st
        assert f"model.layers.{dense}.mlp.experts.0.gate_proj.weight" not in st
    finally:
        st.close()
    cfg = type(tiny_cfg).from_file(out)
    assert cfg.replace(bos_token_id=None, eos_token_id=(), quantization=None, dtype="bfloat16") == tiny_cfg.replace(
        bos_token_id=None, eos_token_id=())
    m = jaxmoe.load(out)
    assert isinstance(m.cfg, tiny_family.config_type) and m.cpu_kernels and m.tokenizer is not None  # JAX on the CPU
    assert m.eos_token_ids  # from the config and the tokenizer


def test_cpu_kernels_are_refused_for_a_family_without_them(tiny_ckpts, tiny_family, monkeypatch):
    import jaxmoe.loaded_model as lm

    assert "cpu_kernels" in tiny_family.supports  # tests/models/test_family_cpu_kernels.py runs them
    without = dataclasses.replace(tiny_family, supports=tiny_family.supports - {"cpu_kernels"})
    monkeypatch.setattr(lm, "_family", lambda path: without)
    with pytest.raises(ValueError, match=f"CPU kernels do not run {re.escape(tiny_family.name)} models yet"):
        jaxmoe.load(tiny_ckpts["bf16"], cpu_kernels=True)
    assert not jaxmoe.load(tiny_ckpts["bf16"], cpu_kernels=None).cpu_kernels


def test_step_forward_per_family():
    """DeepSeek-V3: absorbed MLA for decode, expanded for chunks wide enough (step_shapes.attention_form),
    as the fused step always chose; Qwen3-MoE and GLM-4.5: their one forward each."""
    from jaxmoe.model.forward import forward_absorbed, forward_expanded
    from jaxmoe.models import glm4_moe
    from jaxmoe.models.qwen3_moe import forward
    from jaxmoe.step_shapes import attention_form

    ds = ModelConfig.named("deepseek-v3")
    assert DEEPSEEK_V3.step_forward(ds, 1, 4096) is forward_absorbed
    assert attention_form(ds, 256, 4096) == "expanded"  # on an accelerator
    # the tests' backend is the CPU, where absorbed attention runs faster per multiply-add
    assert attention_form(ds, 256, 4096, on_cpu=True) == "absorbed"
    assert DEEPSEEK_V3.step_forward(ds, 256, 4096) is forward_absorbed
    assert DEEPSEEK_V3.step_forward(ds, 512, 4096) is forward_expanded
    qwen3_cfg, glm_cfg = Qwen3MoeConfig.named("qwen3-moe-tiny"), Glm4MoeConfig.named("glm4-moe-tiny")
    assert QWEN3_MOE.step_forward(qwen3_cfg, 1, 64) is QWEN3_MOE.step_forward(qwen3_cfg, 256, 4096) is forward
    assert GLM4_MOE.step_forward(glm_cfg, 1, 64) is GLM4_MOE.step_forward(glm_cfg, 256, 4096) is glm4_moe.forward
    assert forward is not glm4_moe.forward
