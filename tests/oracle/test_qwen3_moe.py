"""jaxmoe's Qwen3-MoE model (jaxmoe.models.qwen3_moe) against Hugging Face transformers, in fp32.

Tiny random Qwen3MoeForCausalLM models (qwen3_hf.py; hidden 195, head_dim 40 != hidden/heads,
GQA with kv_heads < heads) are built and saved by transformers and loaded by jaxmoe's
Qwen3-MoE loader: "sparse" (normalised top-k, one mlp_only layer) and "step2" (every second
layer sparse, un-normalised top-k, attention biases, tied embeddings); "fp8" is the sparse
model block-quantized to e4m3, read as FP8 by jaxmoe and as our dequantized copy by
transformers. Block tests come first, so a disagreement names the block that causes it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from . import qwen3_hf as Q
from .hf_models import read_checkpoint
from .test_oracle import assert_close

TOL = 1e-4
PROMPT_LEN = 40  # >= 32, not a multiple of 128
NEW_TOKENS = 8
MAX_LEN = 64
SEEDS = {"sparse": 2024, "step2": 4202}


@functools.cache
def jitted_forward():
    from jaxmoe.models.qwen3_moe import forward

    return jax.jit(forward, static_argnums=0, static_argnames=("kv_len",))


def _positions(b: int, t: int) -> np.ndarray:
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def jx_logits(cfg, weights, tokens, positions=None, **kw):
    from jaxmoe.models.qwen3_moe import init_cache

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
    hf: Any  # Qwen3MoeForCausalLM, fp32, eager
    jx_dir: Path
    prompt: np.ndarray  # [1, PROMPT_LEN]
    extra: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def loaded(self):
        from jaxmoe.models.qwen3_moe import load_checkpoint

        return load_checkpoint(self.jx_dir, dtype=jnp.float32)


def _hf_case(name: str, tmp_path_factory) -> Case:
    model = Q.build_model(Q.CONFIGS[name], SEEDS[name])
    path = Q.save_model(model, tmp_path_factory.mktemp(f"qwen3_{name}"))
    prompt = np.random.default_rng(SEEDS[name]).integers(0, Q.CONFIGS[name]["vocab_size"], (1, PROMPT_LEN))
    return Case(name, model, path, prompt)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Case:
    return _hf_case("sparse", tmp_path_factory)


@pytest.fixture(scope="module")
def step2(tmp_path_factory) -> Case:
    return _hf_case("step2", tmp_path_factory)


@pytest.fixture(scope="module")
def fp8(sparse, tmp_path_factory) -> Case:
    tmp = tmp_path_factory.mktemp("qwen3_fp8")
    pair = Q.write_fp8_pair(sparse.jx_dir, tmp / "fp8", tmp / "dequantized")
    return Case("fp8", Q.load_model(pair.ref_dir), pair.fp8_dir, sparse.prompt, dict(unquantized=sparse.hf))


@pytest.fixture(scope="module", params=["sparse", "step2"])
def hf_case(request) -> Case:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=["sparse", "step2", "fp8"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


# ==== config ===================================================================================


@pytest.mark.parametrize("name, dims, total, active", [
    ("qwen3-30b-a3b", (2048, 48, 32, 4, 128, 768, 128, 8), 30.5e9, 3.3e9),
    ("qwen3-235b-a22b", (4096, 94, 64, 4, 128, 1536, 128, 8), 235e9, 22e9),
])
def test_packaged_configs(name, dims, total, active):
    """The published dimensions, and the parameter counts they imply (total / active per token)."""
    import math

    from jaxmoe.models.qwen3_moe import Qwen3MoeConfig, expected_tensors

    c = Qwen3MoeConfig.named(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok) == dims
    assert c.vocab_size == 151936 and c.rope_theta == 1e6 and c.norm_topk_prob and c.rotary_dim == c.head_dim
    assert all(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    specs = expected_tensors(c).values()
    n_total = sum(math.prod(s.shape) for s in specs)
    n_active = sum(math.prod(s.shape) for s in specs if s.expert is None or s.expert < c.num_experts_per_tok)
    assert abs(n_total / total - 1) < 0.01 and abs(n_active / active - 1) < 0.02, (n_total, n_active)
    tiny = Qwen3MoeConfig.named("qwen3-moe-tiny")
    assert tiny.hidden_size % 128 and not tiny.is_moe_layer(2) and tiny.is_moe_layer(3)


def test_config_spellings_and_errors():
    from jaxmoe.config import ConfigError, named_config_path
    from jaxmoe.models.qwen3_moe import Qwen3MoeConfig

    d = json.loads(named_config_path("models", "qwen3-moe-tiny", "model config").read_text())
    new = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype", "num_experts")}
    new.update(rope_parameters={"rope_type": "default", "rope_theta": d["rope_theta"]}, dtype=d["torch_dtype"],
               num_local_experts=d["num_experts"])
    assert Qwen3MoeConfig.from_dict(d) == Qwen3MoeConfig.from_dict(new)
    for key in ("num_key_value_heads", "moe_intermediate_size", "num_experts", "rope_theta"):
        broken = {k: v for k, v in d.items() if k != key}
        with pytest.raises(ConfigError, match=key):
            Qwen3MoeConfig.from_dict(broken)
    with pytest.raises(ConfigError, match="yarn"):
        Qwen3MoeConfig.from_dict(dict(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="deepseek_v3"):
        Qwen3MoeConfig.from_dict(dict(d, model_type="deepseek_v3"))
    with pytest.raises(ConfigError, match="intermediate_size"):
        Qwen3MoeConfig.from_dict(dict(d, intermediate_size=0))


def test_config_matches_transformers(hf_case):
    from jaxmoe.layers.gqa import rope_inv_freq
    from jaxmoe.models.qwen3_moe import Qwen3MoeConfig

    c, h = Qwen3MoeConfig.from_file(hf_case.jx_dir), hf_case.hf.config
    assert (c.head_dim, c.num_key_value_heads, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob,
            c.decoder_sparse_step, list(c.mlp_only_layers), c.attention_bias, c.tie_word_embeddings) == (
        h.head_dim, h.num_key_value_heads, h.num_experts, h.num_experts_per_tok, h.norm_topk_prob,
        h.decoder_sparse_step, list(h.mlp_only_layers), h.attention_bias, h.tie_word_embeddings)
    assert c.rope_theta == h.rope_parameters["rope_theta"]
    np.testing.assert_allclose(rope_inv_freq(c.attention), hf_case.hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("layers, step, mlp_only", [(4, 1, [2]), (6, 2, []), (6, 3, [2]), (5, 2, [1, 4]), (3, 1, [])])
def test_layer_kinds_match_transformers(layers, step, mlp_only):
    """mlp_only_layers and decoder_sparse_step pick the same sparse layers as transformers."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from jaxmoe.models.qwen3_moe import Qwen3MoeConfig

    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
              decoder_sparse_step=step, mlp_only_layers=mlp_only)
    hf = Q.Qwen3MoeForCausalLM(Q.hf_config(kw))
    want = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf.model.layers]
    c = Qwen3MoeConfig.from_dict(hf.config.to_dict())
    assert [c.is_moe_layer(i) for i in range(layers)] == want


def test_loaded_layer_kinds(case):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from jaxmoe.models.qwen3_moe.weights import Qwen3MoeSparseMoeWeights

    want = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in case.hf.model.layers]
    assert [isinstance(lw.mlp, Qwen3MoeSparseMoeWeights) for lw in case.loaded[1].layers] == want
    assert any(want) and not all(want)


# ==== blocks ===================================================================================


def test_router_matches_hf(hf_case):
    """Ids (in order) and weights of the softmax top-k router, on what each MoE layer's router saw."""
    from jaxmoe.layers.softmax_router import route_softmax

    cfg, weights = hf_case.loaded
    seen = Q.capture(hf_case.hf, hf_case.prompt)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for i in moe_layers:
        x = seen[f"router_in.{i}"]
        with torch.no_grad():
            _, hf_w, hf_ids = hf_case.hf.model.layers[i].mlp.gate(torch.from_numpy(x))
        ids, w = route_softmax(weights.layers[i].mlp.gate, jnp.asarray(x), cfg.num_experts_per_tok, cfg.norm_topk_prob)
        np.testing.assert_array_equal(np.asarray(ids), hf_ids.numpy(), err_msg=f"layer {i} router ids")
        assert_close(w, hf_w.numpy(), 1e-6, f"layer {i} router weights")
        # the routing is not trivial: many experts used, no expert takes all the weight
        assert len(np.unique(np.asarray(ids))) >= 12 and float(np.asarray(w)[:, 0].mean()) < 0.8
        if cfg.norm_topk_prob:
            np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
        else:
            assert float(np.asarray(w).sum(-1).max()) < 0.99


def test_attention_matches_hf(hf_case):
    """GQA (kv_heads < heads, q/k RMSNorm, rotary, biases in step2) per layer on its captured input."""
    from jaxmoe.layers.gqa import gqa, init_gqa_cache, rope_cos_sin

    cfg, weights = hf_case.loaded
    seen = Q.capture(hf_case.hf, hf_case.prompt)
    pos = jnp.asarray(_positions(1, PROMPT_LEN))
    cos, sin = rope_cos_sin(cfg.attention, pos)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    for i, lw in enumerate(weights.layers):
        cache = init_gqa_cache(1, cfg.attention, 1, MAX_LEN)
        out, _ = gqa(cfg.attention, lw.self_attn, jnp.asarray(seen[f"attn_in.{i}"]), cache, 0, pos, cos, sin)
        assert_close(out, seen[f"attn_out.{i}"], TOL, f"layer {i} attention")


def test_mlp_blocks_match_hf(hf_case):
    """The dense MLP and the sparse-MoE block per layer on their captured inputs."""
    from jaxmoe.model.moe import mlp
    from jaxmoe.models.qwen3_moe.forward import sparse_moe
    from jaxmoe.models.qwen3_moe.weights import Qwen3MoeSparseMoeWeights

    cfg, weights = hf_case.loaded
    seen = Q.capture(hf_case.hf, hf_case.prompt)
    for i, lw in enumerate(weights.layers):
        x = jnp.asarray(seen[f"mlp_in.{i}"])
        got = sparse_moe(cfg, lw.mlp, x) if isinstance(lw.mlp, Qwen3MoeSparseMoeWeights) else mlp(lw.mlp, x)
        assert_close(got, seen[f"mlp_out.{i}"], TOL, f"layer {i} mlp")


def _numpy_gqa(x, w, c, positions):
    """Reference GQA in float64: projections, per-head RMSNorm, rotary (rotate_half) on the first
    rotary_dim dims of each head, causal softmax with head i reading kv head i // groups."""
    b, t, _ = x.shape
    h, kvh, d, rd = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim

    def norm(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + c.rms_norm_eps) * g

    def rotate(v):
        inv = 1.0 / c.rope_theta ** (np.arange(0, rd, 2) / rd)
        ang = positions[:, :, None, None] * inv  # [b, t, 1, rd/2]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        r = v[..., :rd]
        half = np.concatenate([-r[..., rd // 2:], r[..., : rd // 2]], -1)
        return np.concatenate([r * cos + half * sin, v[..., rd:]], -1)

    q = rotate(norm((x @ w["q"].T).reshape(b, t, h, d), w["q_norm"]))
    k = rotate(norm((x @ w["k"].T).reshape(b, t, kvh, d), w["k_norm"]))
    v = (x @ w["v"].T).reshape(b, t, kvh, d)
    k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = np.where(positions[:, None, None, :] <= positions[:, None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v).reshape(b, t, h * d)
    return out @ w["o"].T


@pytest.mark.parametrize("rotary_dim", [16, 40])
def test_gqa_partial_rotary_against_numpy(rotary_dim):
    """rotary_dim < head_dim (GLM-4.5's partial_rotary_factor) and full rotary, against a numpy
    reference: one prefill, blocked over keys, and token by token through the cache."""
    from jaxmoe.layers.gqa import GQAConfig, GQAWeights, gqa, init_gqa_cache, rope_cos_sin
    from jaxmoe.quant import DenseWeight

    c = GQAConfig(num_attention_heads=6, num_key_value_heads=2, head_dim=40, rotary_dim=rotary_dim, rope_theta=500.0)
    rng = np.random.default_rng(rotary_dim)
    hid, t = 52, 37
    w = {n: rng.standard_normal(s) / np.sqrt(s[1]) for n, s in
         dict(q=(240, hid), k=(80, hid), v=(80, hid), o=(hid, 240)).items()}
    w.update(q_norm=1 + 0.1 * rng.standard_normal(40), k_norm=1 + 0.1 * rng.standard_normal(40))
    x = rng.standard_normal((2, t, hid))
    pos = _positions(2, t)
    want = _numpy_gqa(x, w, c, pos)
    gw = GQAWeights(*(DenseWeight(jnp.asarray(w[n], jnp.float32)) for n in "qkvo"),
                    q_norm=jnp.asarray(w["q_norm"], jnp.float32), k_norm=jnp.asarray(w["k_norm"], jnp.float32))
    xj, pj = jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32)
    cos, sin = rope_cos_sin(c, pj)
    for block in (None, 7):
        cache = init_gqa_cache(1, c, 2, MAX_LEN)
        cache = cache.replace(c_kv=cache.c_kv.at[0, :, t:].set(1e3), k_pe=cache.k_pe.at[0, :, t:].set(1e3))  # stale
        got, cache = gqa(c, gw, xj, cache, 0, pj, cos, sin, block=block)
        assert_close(got, want, 1e-5, f"gqa prefill (block {block})")
    cache, steps = init_gqa_cache(1, c, 2, MAX_LEN), []
    for i in range(t):  # one token at a time through the cache
        out, cache = gqa(c, gw, xj[:, i : i + 1], cache, 0, pj[:, i : i + 1], cos[:, i : i + 1], sin[:, i : i + 1])
        steps.append(np.asarray(out))
    assert_close(np.concatenate(steps, 1), want, 1e-5, "gqa decode")


# ==== the whole model ==========================================================================


def test_logits_match_hf(case):
    cfg, weights = case.loaded
    got, _ = jx_logits(cfg, weights, case.prompt)
    want = Q.logits(case.hf, case.prompt)
    assert_close(got, want, TOL, f"{case.name} logits")
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_greedy_matches_hf(case):
    cfg, weights = case.loaded
    toks, step = jx_greedy(cfg, weights, case.prompt, NEW_TOKENS)
    hf_toks, hf_step = Q.greedy(case.hf, case.prompt, NEW_TOKENS)
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
        assert_close(got[r, :n], Q.logits(hf_case.hf, prompts[r : r + 1, :n])[0], TOL, f"row {r}")
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
    experts = weights.layers[0].mlp.experts
    assert isinstance(experts.down_proj, Fp8Weight) and experts.down_proj.weight_scale_inv.shape == (16, 2, 1)
    assert isinstance(weights.layers[2].mlp.gate_proj, Fp8Weight) and isinstance(weights.lm_head, DenseWeight)
    got, _ = jx_logits(cfg, weights, fp8.prompt)
    assert np.abs(got - Q.logits(fp8.extra["unquantized"], fp8.prompt)).max() > 1e-2


def test_loader_rejects_missing_and_stray_tensors(sparse, tmp_path):
    from jaxmoe.loading.safetensors_index import CheckpointError
    from jaxmoe.models.qwen3_moe import load_checkpoint

    tensors = read_checkpoint(sparse.jx_dir)
    gone = "model.layers.1.self_attn.k_norm.weight"
    for name, edit in [(gone, lambda t: t.pop(gone)),
                       ("model.layers.4.self_attn.q_proj.weight",  # a layer past the last
                        lambda t: t.update({"model.layers.4.self_attn.q_proj.weight": np.zeros((240, 195), np.float32)})),
                       ("model.layers.0.mlp.gate.weight", lambda t: t.update({"model.layers.0.mlp.gate.weight":
                                                                              np.zeros((15, 195), np.float32)}))]:
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        t = dict(tensors)
        edit(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(sparse.jx_dir / "config.json", d / "config.json")
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_checkpoint(d)
