"""jaxmoe's GLM-4.5 model (jaxmoe.models.glm4_moe) against Hugging Face transformers, in fp32.

Tiny random Glm4MoeForCausalLM models (glm4_hf.py; hidden 195, head_dim 40 != hidden/heads,
partial rotary on 20 of 40 dims, q/k/v biases, GQA with kv_heads < heads) are built and saved by
transformers and loaded by jaxmoe's GLM-4.5 loader: "glm45" (q/k norm, 4 expert groups with the
best 2 kept, normalised top-k x 2.5, one shared expert, two dense layers) and "air" (no q/k norm,
one group, un-normalised top-k x 1.5, two shared experts, one dense layer, tied embeddings);
"fp8" is the glm45 model block-quantized to e4m3, read as FP8 by jaxmoe and as our dequantized
copy by transformers. Block tests come first, so a disagreement names the block that causes it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from . import glm4_hf as G
from .test_oracle import assert_close

TOL = 1e-4
PROMPT_LEN = 40  # >= 32, not a multiple of 128
NEW_TOKENS = 8
MAX_LEN = 64
SEEDS = {"glm45": 4545, "air": 5454}


@functools.cache
def jitted_forward():
    from jaxmoe.models.glm4_moe import forward

    return jax.jit(forward, static_argnums=0, static_argnames=("kv_len",))


def _positions(b: int, t: int) -> np.ndarray:
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def jx_logits(cfg, weights, tokens, positions=None, **kw):
    from jaxmoe.models.glm4_moe import init_cache

    tokens = np.asarray(tokens, np.int32)
    positions = _positions(*tokens.shape) if positions is None else positions
    logits, cache = jitted_forward()(cfg, weights, init_cache(cfg, tokens.shape[0], MAX_LEN), jnp.asarray(tokens),
                                     jnp.asarray(positions, jnp.int32), **kw)
    return np.asarray(logits), cache


def jx_greedy(cfg, weights, prompt: np.ndarray, n: int):
    """One prefill, then one cached forward per new token -> (tokens [B, n], step logits [B, n, V])."""
    logits, cache = jx_logits(cfg, weights, prompt)
    step = [logits[:, -1]]
    toks = [step[-1].argmax(-1)]
    for i in range(n - 1):
        pos = np.full((prompt.shape[0], 1), prompt.shape[1] + i, np.int32)
        lg, cache = jitted_forward()(cfg, weights, cache, jnp.asarray(toks[-1][:, None], jnp.int32), jnp.asarray(pos))
        step.append(np.asarray(lg)[:, 0])
        toks.append(step[-1].argmax(-1))
    return np.stack(toks, 1), np.stack(step, 1)


@dataclasses.dataclass
class Case:
    name: str
    hf: Any  # Glm4MoeForCausalLM, fp32, eager
    jx_dir: Path
    prompt: np.ndarray  # [1, PROMPT_LEN]
    extra: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def loaded(self):
        from jaxmoe.models.glm4_moe import load_checkpoint

        return load_checkpoint(self.jx_dir, dtype=jnp.float32)


def _hf_case(name: str, tmp_path_factory) -> Case:
    model = G.build_model(G.CONFIGS[name], SEEDS[name])
    path = G.save_model(model, tmp_path_factory.mktemp(f"glm4_{name}"))
    prompt = np.random.default_rng(SEEDS[name]).integers(0, G.CONFIGS[name]["vocab_size"], (1, PROMPT_LEN))
    return Case(name, model, path, prompt)


@pytest.fixture(scope="module")
def glm45(tmp_path_factory) -> Case:
    return _hf_case("glm45", tmp_path_factory)


@pytest.fixture(scope="module")
def air(tmp_path_factory) -> Case:
    return _hf_case("air", tmp_path_factory)


@pytest.fixture(scope="module")
def fp8(glm45, tmp_path_factory) -> Case:
    tmp = tmp_path_factory.mktemp("glm4_fp8")
    pair = G.write_fp8_pair(glm45.jx_dir, tmp / "fp8", tmp / "dequantized")
    return Case("fp8", G.load_model(pair.ref_dir), pair.fp8_dir, glm45.prompt, dict(unquantized=glm45.hf))


@pytest.fixture(scope="module", params=["glm45", "air"])
def hf_case(request) -> Case:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=["glm45", "air", "fp8"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


# ==== config ===================================================================================


@pytest.mark.parametrize("name, dims, dense, total, active", [
    ("glm-4.5", (5120, 92, 96, 8, 128, 1536, 160, 8, 12288), 3, 355e9, 32e9),
    ("glm-4.5-air", (4096, 46, 96, 8, 128, 1408, 128, 8, 10944), 1, 106e9, 12e9),
])
def test_packaged_configs(name, dims, dense, total, active):
    """The published dimensions, and the parameter counts they imply (total without the MTP layer;
    active per token without embeddings and lm_head, as the model cards count)."""
    from jaxmoe.models.glm4_moe import Glm4MoeConfig, expected_tensors

    c = Glm4MoeConfig.named(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok, c.intermediate_size) == dims
    assert c.vocab_size == 151552 and c.rope_theta == 1e6 and c.rotary_dim == 64 and c.attention_bias
    assert c.norm_topk_prob and c.n_shared_experts == 1 and c.n_group == c.topk_group == 1 and c.num_nextn_predict_layers == 1
    assert [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] == [i >= dense for i in range(c.num_hidden_layers)]
    specs = expected_tensors(c).values()
    n_total = sum(math.prod(s.shape) for s in specs)
    n_active = sum(math.prod(s.shape) for s in specs if s.expert is None or s.expert < c.num_experts_per_tok)
    n_active -= 2 * c.vocab_size * c.hidden_size
    assert abs(n_total / total - 1) < 0.01 and abs(n_active / active - 1) < 0.03, (n_total, n_active)
    tiny = Glm4MoeConfig.named("glm4-moe-tiny")
    assert tiny.hidden_size % 128 and not tiny.is_moe_layer(0) and tiny.is_moe_layer(1) and tiny.rotary_dim == 20


def test_config_spellings_and_errors():
    from jaxmoe.config import ConfigError, named_config_path
    from jaxmoe.models.glm4_moe import Glm4MoeConfig

    d = json.loads(named_config_path("models", "glm4-moe-tiny", "model config").read_text())
    drop = ("rope_theta", "rope_scaling", "torch_dtype", "n_routed_experts", "partial_rotary_factor",
            "num_nextn_predict_layers")
    new = {k: v for k, v in d.items() if k not in drop}
    new.update(rope_parameters={"rope_type": "default", "rope_theta": d["rope_theta"], "partial_rotary_factor": 0.5},
               dtype=d["torch_dtype"], num_local_experts=d["n_routed_experts"], num_mtp_layers=0)
    assert Glm4MoeConfig.from_dict(d) == Glm4MoeConfig.from_dict(new)
    assert Glm4MoeConfig.from_dict(Glm4MoeConfig.from_dict(d).to_hf_dict()) == Glm4MoeConfig.from_dict(d)
    no_factor = {k: v for k, v in d.items() if k != "partial_rotary_factor"}
    assert Glm4MoeConfig.from_dict(no_factor).rotary_dim == 20  # transformers' default 0.5
    assert Glm4MoeConfig.from_dict(dict(d, partial_rotary_factor=1.0)).rotary_dim == 40
    for key in ("num_key_value_heads", "moe_intermediate_size", "n_routed_experts", "rope_theta"):
        broken = {k: v for k, v in d.items() if k != key}
        with pytest.raises(ConfigError, match=key):
            Glm4MoeConfig.from_dict(broken)
    for change, match in [(dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
                          (dict(model_type="deepseek_v3"), "deepseek_v3"),
                          (dict(intermediate_size=0), "intermediate_size"),
                          (dict(n_group=3), "n_group"),
                          (dict(topk_group=5), "topk_group"),
                          (dict(num_experts_per_tok=9, topk_group=2), "num_experts_per_tok"),
                          (dict(partial_rotary_factor=0.125), "rotary")]:
        with pytest.raises(ConfigError, match=match):
            Glm4MoeConfig.from_dict(dict(d, **change))


def test_config_matches_transformers(hf_case):
    from jaxmoe.layers.gqa import rope_inv_freq
    from jaxmoe.models.glm4_moe import Glm4MoeConfig

    c, h = Glm4MoeConfig.from_file(hf_case.jx_dir), hf_case.hf.config
    assert (c.head_dim, c.num_key_value_heads, c.n_routed_experts, c.num_experts_per_tok, c.norm_topk_prob, c.n_group,
            c.topk_group, c.routed_scaling_factor, c.n_shared_experts, c.first_k_dense_replace, c.use_qk_norm,
            c.attention_bias, c.tie_word_embeddings, c.rms_norm_eps) == (
        h.head_dim, h.num_key_value_heads, h.n_routed_experts, h.num_experts_per_tok, h.norm_topk_prob, h.n_group,
        h.topk_group, h.routed_scaling_factor, h.n_shared_experts, h.first_k_dense_replace, h.use_qk_norm,
        h.attention_bias, h.tie_word_embeddings, h.rms_norm_eps)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.rotary_dim == 20
    np.testing.assert_allclose(rope_inv_freq(c.attention), hf_case.hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("layers, first_dense", [(4, 1), (4, 0), (5, 3), (3, 3)])
def test_layer_kinds_match_transformers(layers, first_dense):
    """first_k_dense_replace picks the same dense and sparse layers as transformers."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    from jaxmoe.models.glm4_moe import Glm4MoeConfig

    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
              first_k_dense_replace=first_dense, num_nextn_predict_layers=0)
    hf = G.Glm4MoeForCausalLM(G.hf_config(kw))
    want = [isinstance(layer.mlp, Glm4MoeMoE) for layer in hf.model.layers]
    c = Glm4MoeConfig.from_dict(hf.config.to_dict())
    assert [c.is_moe_layer(i) for i in range(layers)] == want


def test_loaded_layer_kinds(case):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    from jaxmoe.model.weights import MoEWeights

    want = [isinstance(layer.mlp, Glm4MoeMoE) for layer in case.hf.model.layers]
    got = case.loaded[1].layers
    assert [isinstance(lw.mlp, MoEWeights) for lw in got] == want
    assert any(want) and not all(want)
    assert all((lw.self_attn.q_norm is not None) == case.loaded[0].use_qk_norm for lw in got)
    assert all(lw.self_attn.q_proj_bias is not None and lw.self_attn.o_proj_bias is None for lw in got)


# ==== blocks ===================================================================================


def test_router_matches_hf(hf_case):
    """Chosen experts and weights of the sigmoid router (correction bias, group limit, scaling) on
    what each MoE layer's router saw; the correction bias and the group limit change choices."""
    from jaxmoe.model.router import route

    cfg, weights = hf_case.loaded
    seen = G.capture(hf_case.hf, hf_case.prompt)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for i in moe_layers:
        x, gate = seen[f"router_in.{i}"], weights.layers[i].mlp.gate
        with torch.no_grad():
            _, hf_w, hf_ids = hf_case.hf.model.layers[i].mlp.gate(torch.from_numpy(x))
        ids, w = G.by_id(*route(cfg, gate, jnp.asarray(x)))
        hf_ids, hf_w = G.by_id(hf_ids.numpy(), hf_w.numpy())
        np.testing.assert_array_equal(ids, hf_ids, err_msg=f"layer {i} router ids")
        assert_close(w, hf_w, 1e-6, f"layer {i} router weights")
        assert len(np.unique(ids)) >= 12  # many experts used
        sums = w.sum(-1)
        if cfg.norm_topk_prob:
            np.testing.assert_allclose(sums, cfg.routed_scaling_factor, rtol=1e-6)
        else:
            assert sums.max() < 0.99 * cfg.routed_scaling_factor * cfg.num_experts_per_tok
        unbiased, _ = G.by_id(*route(cfg, gate.replace(e_score_correction_bias=jnp.zeros_like(gate.e_score_correction_bias)),
                                    jnp.asarray(x)))
        changed = (unbiased != ids).any(-1).mean()
        assert 0 < changed < 1, f"layer {i}: correction bias changed {changed:.0%} of the choices"
        if cfg.n_group > 1:
            groups = ids // (cfg.n_routed_experts // cfg.n_group)
            assert max(len(set(r)) for r in groups.tolist()) <= cfg.topk_group
            ungrouped, _ = G.by_id(*route(cfg.replace(n_group=1, topk_group=1), gate, jnp.asarray(x)))
            assert (ungrouped != ids).any(-1).mean() > 0, f"layer {i}: the group limit never mattered"


def test_partial_rotary_matches_hf():
    """Rotary on the first rotary_dim dims of each head in halves layout (rotate_half), the rest
    passed through: transformers' cos/sin and apply_rotary_pos_emb against gqa_qkv with identity
    projections."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding, apply_rotary_pos_emb

    from jaxmoe.layers.gqa import GQAWeights, gqa_qkv, rope_cos_sin
    from jaxmoe.models.glm4_moe import Glm4MoeConfig
    from jaxmoe.quant import DenseWeight

    cfg = Glm4MoeConfig.from_dict(G.hf_config(G.GLM45).to_dict())
    c = cfg.attention
    hf_rope = Glm4MoeRotaryEmbedding(G.hf_config(G.GLM45))
    rng = np.random.default_rng(0)
    t, width = 37, c.num_attention_heads * c.head_dim
    x = rng.standard_normal((2, t, width)).astype(np.float32)
    pos = _positions(2, t) + np.array([[0], [100]], np.int32)  # the second row far from 0
    eye = np.eye(width, dtype=np.float32)
    w = GQAWeights(*(DenseWeight(jnp.asarray(m)) for m in (eye, eye[: c.kv_width], eye[: c.kv_width], eye)))
    cos, sin = rope_cos_sin(c, jnp.asarray(pos))
    q, k, _ = gqa_qkv(c, w, jnp.asarray(x), cos, sin)
    hq = torch.from_numpy(x).view(2, t, -1, c.head_dim).transpose(1, 2)
    hk = torch.from_numpy(x[..., : c.kv_width]).view(2, t, -1, c.head_dim).transpose(1, 2)
    with torch.no_grad():
        hcos, hsin = hf_rope(hq, torch.from_numpy(pos).long())
        want_q, want_k = apply_rotary_pos_emb(hq, hk, hcos, hsin)
    assert hcos.shape[-1] == c.rotary_dim == 20
    assert_close(q, want_q.transpose(1, 2).numpy(), 1e-5, "rotated queries")
    assert_close(k, want_k.transpose(1, 2).numpy(), 1e-5, "rotated keys")
    xh = x.reshape(2, t, -1, c.head_dim)
    np.testing.assert_array_equal(np.asarray(q)[..., c.rotary_dim:], xh[..., c.rotary_dim:])  # passed through
    inter, _, _ = gqa_qkv(dataclasses.replace(c, rope_interleave=True), w, jnp.asarray(x), cos, sin)
    assert np.abs(np.asarray(inter) - np.asarray(q)).max() > 0.1  # the layout matters


def test_attention_matches_hf(hf_case):
    """GQA (kv_heads < heads, q/k/v biases, q/k RMSNorm in glm45, partial rotary) per layer on its
    captured input, in one prefill and token by token through the cache."""
    from jaxmoe.layers.gqa import gqa, init_gqa_cache, rope_cos_sin

    cfg, weights = hf_case.loaded
    seen = G.capture(hf_case.hf, hf_case.prompt)
    pos = jnp.asarray(_positions(1, PROMPT_LEN))
    cos, sin = rope_cos_sin(cfg.attention, pos)
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.attention_bias
    for i, lw in enumerate(weights.layers):
        x = jnp.asarray(seen[f"attn_in.{i}"])
        out, _ = gqa(cfg.attention, lw.self_attn, x, init_gqa_cache(1, cfg.attention, 1, MAX_LEN), 0, pos, cos, sin)
        assert_close(out, seen[f"attn_out.{i}"], TOL, f"layer {i} attention")
    cache, steps = init_gqa_cache(1, cfg.attention, 1, MAX_LEN), []
    lw = weights.layers[-1]
    for t in range(PROMPT_LEN):
        sl = slice(t, t + 1)
        out, cache = gqa(cfg.attention, lw.self_attn, x[:, sl], cache, 0, pos[:, sl], cos[:, sl], sin[:, sl])
        steps.append(np.asarray(out))
    assert_close(np.concatenate(steps, 1), seen[f"attn_out.{cfg.num_hidden_layers - 1}"], TOL, "attention decode")


def test_mlp_blocks_match_hf(hf_case):
    """The dense MLP and the MoE block (routed + shared experts) per layer on their captured inputs."""
    from jaxmoe.model.moe import mlp
    from jaxmoe.model.weights import MoEWeights
    from jaxmoe.models.glm4_moe.forward import sparse_moe

    cfg, weights = hf_case.loaded
    seen = G.capture(hf_case.hf, hf_case.prompt)
    for i, lw in enumerate(weights.layers):
        x = jnp.asarray(seen[f"mlp_in.{i}"])
        if isinstance(lw.mlp, MoEWeights):
            got = sparse_moe(cfg, lw.mlp, x)
            shared = np.asarray(mlp(lw.mlp.shared_experts, x))
            assert np.abs(shared).max() > 0.1 and np.abs(np.asarray(got) - shared).max() > 0.1  # both parts matter
        else:
            got = mlp(lw.mlp, x)
        assert_close(got, seen[f"mlp_out.{i}"], TOL, f"layer {i} mlp")


# ==== the whole model ==========================================================================


def test_logits_match_hf(case):
    cfg, weights = case.loaded
    got, _ = jx_logits(cfg, weights, case.prompt)
    want = G.logits(case.hf, case.prompt)
    assert_close(got, want, TOL, f"{case.name} logits")
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_greedy_matches_hf(case):
    cfg, weights = case.loaded
    toks, step = jx_greedy(cfg, weights, case.prompt, NEW_TOKENS)
    hf_toks, hf_step = G.greedy(case.hf, case.prompt, NEW_TOKENS)
    np.testing.assert_array_equal(toks, hf_toks)
    assert_close(step, hf_step, TOL, f"{case.name} greedy step logits")
    if not cfg.tie_word_embeddings:  # tied random embeddings make a token its own best successor
        assert len(set(toks[0].tolist())) > 1


def test_padded_batch_logit_index_and_kv_len(hf_case):
    """Two right-padded prompts in one batch (padding at position MAX_LEN: computed, never cached
    nor attended to) give each prompt's own logits; logit_index and kv_len agree."""
    cfg, weights = hf_case.loaded
    lengths = np.array([PROMPT_LEN, 29])
    rng = np.random.default_rng(7)
    prompts = rng.integers(0, cfg.vocab_size, (2, PROMPT_LEN))
    pos = np.where(np.arange(PROMPT_LEN)[None] < lengths[:, None], np.arange(PROMPT_LEN)[None], MAX_LEN)
    got, cache = jx_logits(cfg, weights, prompts, pos)
    for r, n in enumerate(lengths):
        assert_close(got[r, :n], G.logits(hf_case.hf, prompts[r : r + 1, :n])[0], TOL, f"row {r}")
    assert not np.asarray(cache.c_kv[:, 1, lengths[1]:]).any() and not np.asarray(cache.k_pe[:, 1, lengths[1]:]).any()
    last, _ = jx_logits(cfg, weights, prompts, pos, logit_index=jnp.asarray(lengths - 1))
    assert_close(last[:, 0], got[np.arange(2), lengths - 1], 1e-5, "logit_index")
    windowed, _ = jx_logits(cfg, weights, prompts, pos, kv_len=48)
    real = pos < MAX_LEN  # padding queries may see a different window: their logits are not part of the contract
    assert_close(windowed[real], got[real], 1e-5, "kv_len")


def test_fp8_weights_are_fp8(fp8):
    """The FP8 case really runs e4m3 weights with partial-block scales, and quantization matters."""
    from jaxmoe.quant import DenseWeight, Fp8Weight

    cfg, weights = fp8.loaded
    assert cfg.quantization is not None
    attn = weights.layers[0].self_attn
    assert isinstance(attn.q_proj, Fp8Weight) and attn.q_proj.weight_scale_inv.shape == (2, 2)
    dense = weights.layers[0].mlp
    assert isinstance(dense.gate_proj, Fp8Weight) and dense.gate_proj.weight_scale_inv.shape == (3, 2)
    moe = weights.layers[2].mlp
    assert isinstance(moe.experts.down_proj, Fp8Weight) and moe.experts.down_proj.weight_scale_inv.shape == (16, 2, 1)
    assert isinstance(moe.shared_experts.up_proj, Fp8Weight) and isinstance(weights.lm_head, DenseWeight)
    assert moe.gate.e_score_correction_bias.dtype == jnp.float32
    got, _ = jx_logits(cfg, weights, fp8.prompt)
    assert np.abs(got - G.logits(fp8.extra["unquantized"], fp8.prompt)).max() > 1e-2


def test_loader_rejects_missing_and_stray_tensors(glm45, tmp_path):
    from jaxmoe.loading.safetensors_index import CheckpointError
    from jaxmoe.models.glm4_moe import load_checkpoint

    gone = "model.layers.3.mlp.gate.e_score_correction_bias"
    past = "model.layers.4.self_attn.q_proj.weight"  # a layer past the last, no MTP module declared
    for name, edit in [(gone, lambda t: t.pop(gone)),
                       ("model.layers.1.self_attn.k_proj.bias", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias")),
                       (past, lambda t: t.update({past: np.zeros((240, 195), np.float32)})),
                       ("model.layers.2.mlp.gate.weight", lambda t: t.update({"model.layers.2.mlp.gate.weight":
                                                                              np.zeros((15, 195), np.float32)}))]:
        d = G.edited_checkpoint(glm45.jx_dir, tmp_path / name.replace(".", "_"), edit)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_checkpoint(d)


def test_loader_skips_mtp_layers(glm45, tmp_path):
    """With num_nextn_predict_layers 1 the MTP layer's tensors (layer L: eh_proj, enorm, hnorm,
    shared_head, a decoder layer) are skipped and change nothing; a layer after it is still refused."""
    from jaxmoe.loading.safetensors_index import CheckpointError
    from jaxmoe.models.glm4_moe import Glm4MoeCheckpoint, load_checkpoint

    h = 195
    mtp = {"model.layers.4.eh_proj.weight": np.zeros((h, 2 * h), np.float32),
           **{f"model.layers.4.{n}.weight": np.ones(h, np.float32) for n in ("enorm", "hnorm", "shared_head.norm")},
           "model.layers.4.self_attn.q_proj.weight": np.zeros((240, h), np.float32),
           "model.layers.4.mlp.experts.0.up_proj.weight": np.zeros((72, h), np.float32)}
    d = G.edited_checkpoint(glm45.jx_dir, tmp_path / "mtp", lambda t: t.update(mtp), dict(num_nextn_predict_layers=1))
    with Glm4MoeCheckpoint(d) as ck:
        assert sorted(ck.skipped) == sorted(mtp)
    cfg, weights = load_checkpoint(d)
    assert cfg.num_nextn_predict_layers == 1 and len(weights.layers) == 4
    assert_close(jx_logits(cfg, weights, glm45.prompt)[0], G.logits(glm45.hf, glm45.prompt), TOL, "logits with MTP")
    after = "model.layers.5.enorm.weight"
    d = G.edited_checkpoint(glm45.jx_dir, tmp_path / "after", lambda t: t.update(mtp, **{after: np.ones(h, np.float32)}),
                           dict(num_nextn_predict_layers=1))
    with pytest.raises(CheckpointError, match=after.replace(".", r"\.")):
        load_checkpoint(d)


def test_synthetic_checkpoint_round_trip(tmp_path):
    """The packaged tiny config written as a synthetic FP8 checkpoint loads and runs."""
    from jaxmoe.models.glm4_moe import Glm4MoeConfig, load_checkpoint
    from jaxmoe.models.glm4_moe.synthetic import write_synthetic_checkpoint
    from jaxmoe.quant import Fp8Weight

    tiny = Glm4MoeConfig.named("glm4-moe-tiny")
    path = write_synthetic_checkpoint(tmp_path / "tiny", tiny, fmt="fp8", with_tokenizer=False, progress=False)
    cfg, weights = load_checkpoint(path)
    assert cfg.replace(quantization=None, dtype="bfloat16") == tiny.replace(quantization=None)
    assert isinstance(weights.layers[1].mlp.experts.gate_proj, Fp8Weight)
    logits, _ = jx_logits(cfg, weights, np.arange(12)[None] % cfg.vocab_size)
    assert np.isfinite(logits).all()
