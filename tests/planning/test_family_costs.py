"""The planner's cost model for every family (planning/cost_model.py around the family's
`attention_costs`: MLA or GQA) against what the rest of jaxmoe says about the same model: the
checkpoint's tensor list (what the family's loader expects), the KV cache the engine allocates
(`registry.cache_bytes_per_position`), and the published parameter counts."""

from __future__ import annotations

import math

import jax.numpy as jnp
import pytest

from jaxmoe.loading import hf_map as deepseek_map
from jaxmoe.models.glm4_moe import hf_map as glm4_map
from jaxmoe.models.qwen3_moe import hf_map as qwen3_map
from jaxmoe.models.registry import cache_bytes_per_position, family_of, read_config
from jaxmoe.planning.cost_model import linear_bytes, model_costs

MAPS = {"DeepSeek-V3": deepseek_map, "Qwen3-MoE": qwen3_map, "GLM-4.5": glm4_map}
# (total, active, whether the active count includes embeddings and lm_head) as published; GLM-4.5's
# totals include its MTP layer, which jaxmoe skips, and its active counts leave the embeddings out
PUBLISHED = {"deepseek-v3": (671e9, 37e9, True), "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
             "qwen3-235b-a22b": (235e9, 22e9, True), "glm-4.5-air": (106e9, 12e9, False), "glm-4.5": (355e9, 32e9, False)}
CONFIGS = [*PUBLISHED, "kimi-k2", "bench-v3-mid", "qwen3-moe-mid", "qwen3-moe-tiny", "glm4-moe-tiny"]


def _specs(cfg):
    return list(MAPS[family_of(cfg).name].expected_tensors(cfg).values())


def _is_router(s) -> bool:
    return s.name.endswith("mlp.gate.weight")


@pytest.mark.parametrize("name", CONFIGS)
def test_bytes_are_the_checkpoint_tensors(name):
    """Stored bytes: each Linear as the checkpoint holds it (FP8 + block scales, or bf16), embeddings,
    lm_head and routers in bf16, and at most 4 bytes per element of the small tensors (norms,
    biases); the KV cache per position is the engine's, in bf16."""
    cfg = read_config(name)
    mc, specs = model_costs(cfg), _specs(cfg)
    linears = sum(linear_bytes(cfg, *s.shape) for s in specs if s.kind == "linear" and s.name != "lm_head.weight")
    bf16 = 2 * sum(math.prod(s.shape) for s in specs
                   if s.name in ("model.embed_tokens.weight", "lm_head.weight") or _is_router(s))
    small = sum(math.prod(s.shape) for s in specs if s.kind != "linear" and not _is_router(s)
                and s.name != "model.embed_tokens.weight")
    assert linears + bf16 <= mc.total_bytes <= linears + bf16 + 4 * small + 4 * cfg.n_routed_experts * mc.moe_layers
    routed = sum(linear_bytes(cfg, *s.shape) for s in specs if s.expert is not None)
    assert mc.routed_bytes == routed
    assert mc.kv_bytes_per_token == cache_bytes_per_position(cfg, jnp.bfloat16)


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_per_token_are_the_active_linears(name):
    """2 FLOPs per active weight of every Linear a token goes through (the k routed experts of
    each MoE layer, the router; not lm_head, and not MLA's kv_b_proj: attention_flops counts
    it with the cache it expands)."""
    cfg = read_config(name)
    mc, specs = model_costs(cfg), _specs(cfg)
    active = sum(math.prod(s.shape) * (cfg.num_experts_per_tok / cfg.n_routed_experts if s.expert is not None else 1)
                 for s in specs if (s.kind == "linear" or _is_router(s)) and s.name != "lm_head.weight"
                 and "kv_b_proj" not in s.name)
    assert mc.flops_per_token == pytest.approx(2 * active, rel=1e-12)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_are_the_published_ones(name):
    cfg = read_config(name)
    specs = _specs(cfg)
    total = sum(math.prod(s.shape) for s in specs)
    routed = sum(math.prod(s.shape) for s in specs if s.expert is not None)
    active = total - routed * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    want_total, want_active, with_embeddings = PUBLISHED[name]
    if not with_embeddings:
        active -= 2 * cfg.vocab_size * cfg.hidden_size
    assert total == pytest.approx(want_total, rel=0.03)
    assert active == pytest.approx(want_active, rel=0.03)


def test_gqa_attention_costs_by_hand():
    """Qwen3-30B-A3B: 32 query heads, 4 key/value heads of 128, hidden 2048."""
    cfg = read_config("qwen3-30b-a3b")
    mc = model_costs(cfg)
    a = mc.attn
    assert a.kind == "gqa" and not a.absorbs
    assert a.linears == ((4096, 2048), (512, 2048), (512, 2048), (2048, 4096)) and a.cache_matrices == ()
    assert a.kv_width == 2 * 4 * 128
    # a query at position p scores p + 1 keys in each of 32 heads: q.k and p.v, 2 x 128 multiply-adds each
    assert mc.attention_flops(0, 1) == 32 * 2 * (2 * 128)
    assert mc.attention_flops(100, 10) == (10 * 100 + 55) * 32 * 4 * 128
    assert mc.absorbed_attention_flops(1000) == 1000 * 32 * 4 * 128  # decode reads the cache as it is


def test_mla_attention_costs_keep_the_latent_forms():
    cfg = read_config("deepseek-v3")
    a = model_costs(cfg).attn
    assert a.kind == "mla" and a.absorbs and a.kv_width == 512 + 64
    assert a.cache_matrices == ((128 * (128 + 128), 512),)
    assert a.absorbed_groups == (128 * 128 * 512, 128 * 128 * 512)
    assert a.score_flops == 2 * (192 + 128) and a.absorbed_score_flops == 2 * (2 * 512 + 64)
