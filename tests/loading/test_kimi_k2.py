"""Kimi-K2: the DeepSeek-V3 architecture with 384 routed experts and no expert groups
(n_group 1). The packaged real config (its size from its dimensions), a tiny variant that keeps
the 384 experts / top-8 / n_group 1 routing end to end (synth, load, generate on the CPU-only
engine), the router against a numpy twin of DeepSeek's noaux_tc rule, and the planner on the
reference box."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe.cli import main as cli_main
from jaxmoe.config import ModelConfig
from jaxmoe.loading import hf_map
from jaxmoe.loading.loader import load_checkpoint
from jaxmoe.model.router import route
from jaxmoe.planning.cost_model import model_costs
from jaxmoe.planning.planner import estimate_decode, estimate_prefill, load_hardware, plan_prefill

KIMI = ModelConfig.named("kimi-k2")
TINY = ModelConfig.named("kimi-k2-tiny")


# ---- the real config ------------------------------------------------------------------------


def test_real_config_parses_with_kimi_k2_instruct_dimensions():
    c = KIMI
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (7168, 61, 64, 163840)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (384, 8, 1)
    assert (c.n_group, c.topk_group, c.first_k_dense_replace, c.moe_layer_freq) == (1, 1, 1, 1)
    assert (c.moe_intermediate_size, c.intermediate_size) == (2048, 18432)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert c.routed_scaling_factor == pytest.approx(2.827) and c.norm_topk_prob
    assert (c.scoring_func, c.topk_method) == ("sigmoid", "noaux_tc")
    assert c.rope_theta == 50000.0 and c.max_position_embeddings == 131072
    assert (c.rope_scaling.factor, c.rope_scaling.original_max_position_embeddings) == (32.0, 4096)
    assert c.quantization is not None and c.quantization.weight_block_size == (128, 128)
    assert (c.bos_token_id, c.eos_token_id) == (163584, (163585,))
    assert [i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)] == [0]  # 1 dense + 60 MoE layers
    assert ModelConfig.from_dict(c.to_hf_dict()) == c  # what a synthetic checkpoint writes reads back the same


def _params_from_dims(c: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of a DeepSeek-V3-family model, from its dimensions
    alone (MLA with q_lora, no MTP module, untied embeddings): the formula the test trusts."""
    h, heads = c.hidden_size, c.num_attention_heads
    mla = (c.q_lora_rank * h + c.q_lora_rank  # q_a_proj + q_a_layernorm
           + heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) * c.q_lora_rank  # q_b_proj
           + (c.kv_lora_rank + c.qk_rope_head_dim) * h + c.kv_lora_rank  # kv_a_proj_with_mqa + kv_a_layernorm
           + heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank  # kv_b_proj
           + h * heads * c.v_head_dim)  # o_proj
    swiglu = lambda inter: 3 * h * inter  # noqa: E731  gate, up, down
    n_moe = c.num_hidden_layers - c.first_k_dense_replace  # moe_layer_freq 1
    per_moe = c.n_routed_experts * h + c.n_routed_experts + swiglu(c.n_shared_experts * c.moe_intermediate_size)
    common = (c.num_hidden_layers * (mla + 2 * h) + c.first_k_dense_replace * swiglu(c.intermediate_size)
              + n_moe * per_moe + 2 * c.vocab_size * h + h)  # + embed, lm_head, final norm
    expert = swiglu(c.moe_intermediate_size)
    return common + n_moe * c.n_routed_experts * expert, common + n_moe * c.num_experts_per_tok * expert


def test_parameter_count_is_1t_total_32b_active():
    total, active = _params_from_dims(KIMI)
    # the checkpoint's tensor list (what the loader expects) holds exactly these parameters
    specs = hf_map.expected_tensors(KIMI).values()
    assert sum(math.prod(s.shape) for s in specs) == total
    routed = sum(math.prod(s.shape) for s in specs if s.expert is not None)
    assert routed == 60 * 384 * 3 * 7168 * 2048
    # the planner's cost model sees the same experts
    mc = model_costs(KIMI)
    assert mc.moe_layers == 60 and mc.moe_layers * KIMI.n_routed_experts * mc.expert_weights == routed
    assert mc.moe_layers * mc.routed_flops_per_layer == 2 * 60 * 8 * 3 * 7168 * 2048
    # its bytes, from the tensor list: FP8 Linears (a byte per weight + an f32 scale per 128x128 block), bf16
    # embeddings and lm_head, and at most 4 bytes per small float tensor element (norms, routers)
    fp8 = sum(math.prod(s.shape) + 4 * math.ceil(s.shape[0] / 128) * math.ceil(s.shape[1] / 128)
              for s in specs if s.kind == "linear" and s.name != "lm_head.weight")
    bf16 = 2 * KIMI.vocab_size * KIMI.hidden_size * 2  # embed_tokens + lm_head
    small = sum(math.prod(s.shape) for s in specs if s.kind != "linear" and s.name != "model.embed_tokens.weight")
    assert fp8 + bf16 < mc.total_bytes <= fp8 + bf16 + 4 * small
    # Moonshot's figures: "1T total, 32B activated" (~1.03T from the dimensions)
    assert total == pytest.approx(1.03e12, rel=0.02)
    assert active == pytest.approx(32e9, rel=0.05)
    # against DeepSeek-V3 by the same formula: 671B / 37B
    v3_total, v3_active = _params_from_dims(ModelConfig.named("deepseek-v3"))
    assert v3_total == pytest.approx(671e9, rel=0.01) and v3_active == pytest.approx(37e9, rel=0.03)


# ---- the tiny variant, end to end -----------------------------------------------------------


def test_tiny_variant_keeps_the_routing_shape():
    t = TINY
    assert (t.n_routed_experts, t.num_experts_per_tok, t.n_group, t.topk_group) == (384, 8, 1, 1)
    assert t.routed_scaling_factor == KIMI.routed_scaling_factor and t.rope_theta == KIMI.rope_theta
    assert t.hidden_size <= 64 and t.moe_intermediate_size <= 32


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi") / "kimi-k2-tiny"
    assert cli_main(["synth", "--config", "kimi-k2-tiny", "--out", str(out)]) == 0
    return out


def test_tiny_synthesizes_loads_and_generates_on_the_cpu_only_engine(tiny_ckpt):
    m = jaxmoe.load(tiny_ckpt, runtime="cpu-only", cpu_precision="exact")
    assert m.cfg == ModelConfig.from_file(tiny_ckpt)
    assert (m.cfg.n_routed_experts, m.cfg.n_group) == (384, 1) and m.runtime.accelerators == 0
    assert m.weights.layers[1].mlp.gate.weight.shape == (384, TINY.hidden_size)
    r = jaxmoe.generate(m, "The quick brown fox", max_new_tokens=6, ignore_eos=True)
    assert len(r.token_ids) == 6 and all(0 <= t < TINY.vocab_size for t in r.token_ids)
    assert r.finish_reason == "length"
    # the pure JAX path (384 experts gathered by XLA) decodes the same greedy tokens
    pure = jaxmoe.load(tiny_ckpt, runtime="cpu-only", cpu_kernels=False)
    assert jaxmoe.generate(pure, "The quick brown fox", max_new_tokens=6, ignore_eos=True).token_ids == r.token_ids


def test_tiny_streamed_prefill_splits_384_experts_over_two_simulated_gpus(tiny_ckpt):
    """dslp (SmallEP: 192 experts per device, two fake CPU devices) prefills to the same greedy
    tokens as the CPU-only engine."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ref = jaxmoe.load(tiny_ckpt, runtime="cpu-only", cpu_kernels=False)
    want = jaxmoe.generate(ref, prompt, max_new_tokens=4, ignore_eos=True).token_ids
    m = jaxmoe.load(tiny_ckpt, runtime="2gpu+cpu-experts", simulate_accelerators=True, prefill_strategy="dslp",
                    n_slots=2, chunk_size=16, max_seq_len=128, cpu_kernels=False)
    try:
        out = jaxmoe.generate(m, prompt, max_new_tokens=4, ignore_eos=True)
        assert out.timings.prefill_strategy == "dslp" and out.token_ids == want
    finally:
        m.close()


# ---- the router ------------------------------------------------------------------------------


def noaux_tc_reference(cfg: ModelConfig, weight: np.ndarray, bias: np.ndarray, x: np.ndarray,
                       use_bias: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek-V3's MoEGate (topk_method "noaux_tc"), in numpy float64: sigmoid scores; the
    correction bias added for the choice only; each of n_group groups scored by the sum of its
    two best choice scores, the best topk_group groups kept (the others' experts masked to 0);
    top-k of what is left; weights = the unbiased scores of the chosen experts, normalised,
    times routed_scaling_factor. Also returns each token's margin between the k-th and the
    (k+1)-th masked choice score (a near tie may go either way in float32)."""
    scores = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ weight.astype(np.float64).T)))
    choice = scores + (bias.astype(np.float64) if use_bias else 0.0)
    n, e, k = len(x), cfg.n_routed_experts, cfg.num_experts_per_tok
    group_scores = np.sort(choice.reshape(n, cfg.n_group, e // cfg.n_group), -1)[..., -2:].sum(-1)
    keep = np.argsort(-group_scores, -1, kind="stable")[:, : cfg.topk_group]
    group_mask = np.zeros((n, cfg.n_group), bool)
    np.put_along_axis(group_mask, keep, True, -1)
    masked = np.where(np.repeat(group_mask, e // cfg.n_group, -1), choice, 0.0)
    order = np.argsort(-masked, -1, kind="stable")
    ids = order[:, :k]
    ranked = np.take_along_axis(masked, order[:, : k + 1], -1)
    w = np.take_along_axis(scores, ids, -1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor, ranked[:, k - 1] - ranked[:, k]


def _sorted(ids: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(ids, -1)
    return np.take_along_axis(ids, o, -1), np.take_along_axis(w, o, -1)


def test_router_picks_the_noaux_tc_top8_of_384(tiny_ckpt):
    cfg, w = load_checkpoint(tiny_ckpt, load_experts=False)
    assert cfg.n_group == 1 and cfg.n_routed_experts == 384
    x = np.random.default_rng(7).standard_normal((256, cfg.hidden_size)).astype(np.float32)
    grouped = cfg.replace(n_group=8, topk_group=4)  # DeepSeek-V3's grouping, for contrast
    for i in [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]:
        gate = w.layers[i].mlp.gate
        weight, bias = np.asarray(gate.weight, np.float32), np.asarray(gate.e_score_correction_bias, np.float32)
        want_ids, want_w, margin = noaux_tc_reference(cfg, weight, bias, x)
        clear = margin > 1e-5  # tokens whose 8th and 9th choices are not a float32 near-tie
        assert clear.mean() > 0.95
        got_ids, got_w = (np.asarray(a) for a in route(cfg, gate, jnp.asarray(x)))
        assert got_ids.shape == (256, 8) and got_w.shape == (256, 8)
        assert all(len(set(row)) == 8 for row in got_ids.tolist())
        got_ids, got_w = _sorted(got_ids, got_w)
        want_ids, want_w = _sorted(want_ids, want_w)
        np.testing.assert_array_equal(got_ids[clear], want_ids[clear], err_msg=f"layer {i}: expert choice")
        np.testing.assert_allclose(got_w[clear], want_w[clear], rtol=1e-5, atol=1e-6, err_msg=f"layer {i}: gate weights")
        np.testing.assert_allclose(got_w.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
        # the case is not too easy: the bias changes choices, and so would V3's group limit
        no_bias = _sorted(*noaux_tc_reference(cfg, weight, bias, x, use_bias=False)[:2])[0]
        assert (no_bias != want_ids).any(-1)[clear].sum() > 0
        v3_rule = _sorted(*noaux_tc_reference(grouped, weight, bias, x)[:2])[0]
        assert (v3_rule != want_ids).any(-1)[clear].sum() > 0


# ---- the planner -----------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("n_tokens", [512, 8192, 32768])
def test_planner_plans_kimi_k2_on_the_reference_box(gpus, n_tokens):
    hw = load_hardware("reference-box", calibrate=False).with_gpus(gpus)
    mc = model_costs(KIMI)
    plan = plan_prefill(KIMI, hw, n_tokens)
    assert plan.choice.feasible and plan.choice.seconds > 0
    assert plan.choice.strategy in ("cpu", "slp", "dslp")
    assert not plan.estimates["resident"].feasible  # ~1 TB of weights on a 32 GB GPU
    # SLP moves every routed expert over PCIe at least once
    slp = estimate_prefill(KIMI, hw.with_gpus(1), n_tokens, "slp")
    assert slp.feasible and slp.transfer_s >= mc.routed_bytes / (hw.gpu.pcie_gbps * 1e9)
    # decode reads 8 of 384 experts per MoE layer per token (batch 1)
    dec = estimate_decode(KIMI, hw)
    assert dec.bytes_per_token >= 60 * 8 * mc.expert_bytes and math.isfinite(dec.seconds)
