"""jaxmoe's DeepSeek-V3 model against Hugging Face transformers (the oracle), in fp32.

Tiny random DeepseekV3ForCausalLM models (3 layers, first_k_dense_replace 1, n_group 4 /
topk_group 2, YaRN, kv_lora; with q_lora and interleaved rope, and without q_lora with the rope
dims in halves) are built and saved by transformers and loaded by jaxmoe's checkpoint loader;
the FP8 case is the q_lora model block-quantized to e4m3
with partial 128x128 edge blocks, read as FP8 by jaxmoe and as our own dequantized copy by
transformers. Block-level tests come first, so a disagreement names the block that causes it.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from . import hf_models as H
from .conftest import MAX_LEN, NEW_TOKENS, PROMPT_LEN, jitted, jx_greedy, jx_prefill, new_cache

TOL = 1e-4  # max abs error on logits and block outputs (fp32 both sides)


def assert_close(got, want, tol, what: str) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    err = np.abs(got - want)
    worst = float(err.max()) if err.size else 0.0
    if not worst <= tol:  # also catches NaN
        idx = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        pytest.fail(
            f"{what}: max abs error {worst:.3g} > {tol:g} at index {tuple(int(i) for i in idx)} "
            f"(jaxmoe {got[idx]:.6g} vs transformers {want[idx]:.6g}; reference max |x| "
            f"{np.abs(want).max():.3g}; {(err > tol).mean():.1%} of entries off)"
        )
    return worst


def _positions(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.fixture(scope="module", params=["qlora", "no_qlora"])
def hf_case(request):
    """The two models saved by transformers itself (not the FP8 derivative)."""
    return request.getfixturevalue(request.param)


# ==== block level ============================================================================


def test_rms_norm_matches_hf():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from jaxmoe.model.norm import rms_norm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 7, 200)) * 3 + 0.5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(200)).astype(np.float32)
    ref = DeepseekV3RMSNorm(200, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        want = ref(torch.from_numpy(x)).numpy()
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)
    assert_close(got, want, 1e-5, "rms_norm vs DeepseekV3RMSNorm")


def test_rope_yarn_parameters_match_hf(hf_case):
    """inv_freq, the cos/sin attention factor and the softmax scale (mscale_all_dim^2) under
    YaRN, from jaxmoe's config parser, against transformers' _compute_yarn_parameters."""
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    from jaxmoe.config import ModelConfig
    from jaxmoe.model.rope import rope_inv_freq

    cfg = ModelConfig.from_file(hf_case.jx_dir)
    hf_inv, hf_factor = _compute_yarn_parameters(copy.deepcopy(hf_case.hf.config))
    inv, factor = rope_inv_freq(cfg)
    np.testing.assert_allclose(np.asarray(inv), hf_inv.numpy(), rtol=1e-6, err_msg="YaRN inv_freq")
    np.testing.assert_allclose(np.asarray(hf_case.hf.model.rotary_emb.inv_freq), hf_inv.numpy(), rtol=0)
    assert math.isclose(factor, hf_factor, rel_tol=1e-6), f"YaRN attention factor {factor} != HF {hf_factor}"
    hf_scale = hf_case.hf.model.layers[0].self_attn.scaling
    assert math.isclose(cfg.softmax_scale, hf_scale, rel_tol=1e-6), f"softmax scale {cfg.softmax_scale} != HF {hf_scale}"

    # The case really exercises YaRN: some frequencies interpolated (divided by factor), some kept.
    rp = H.CONFIGS[hf_case.name]["rope_parameters"]
    plain = 1.0 / rp["rope_theta"] ** (np.arange(0, cfg.qk_rope_head_dim, 2) / cfg.qk_rope_head_dim)
    ratio = hf_inv.numpy() / plain
    assert np.isclose(ratio, 1.0, rtol=1e-5).any() and np.isclose(ratio, 1 / rp["factor"], rtol=1e-5).any()
    assert not math.isclose(hf_scale, cfg.qk_head_dim**-0.5), "mscale_all_dim should change the softmax scale"
    if rp["mscale"] != rp["mscale_all_dim"]:
        assert not math.isclose(hf_factor, 1.0), "mscale != mscale_all_dim should give an attention factor != 1"


def test_rope_rotation_matches_hf(hf_case):
    """cos/sin at positions and the rotation of q_pe/k_pe against transformers' rotary embedding
    and its apply function for the checkpoint's layout: interleaved pairs (DeepSeek's, the
    qlora case) or halves (rope_interleave false, the no_qlora case)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    from jaxmoe.config import ModelConfig
    from jaxmoe.model.rope import apply_rope, rope_cos_sin

    interleave = hf_case.hf.config.rope_interleave
    assert interleave == H.CONFIGS[hf_case.name].get("rope_interleave", True)
    cfg = ModelConfig.from_file(hf_case.jx_dir)
    t, h, d = PROMPT_LEN + NEW_TOKENS, cfg.num_attention_heads, cfg.qk_rope_head_dim
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, t, h, d)).astype(np.float32)
    k = rng.standard_normal((1, t, 1, d)).astype(np.float32)
    pos = np.arange(t)[None]
    hf_apply = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    with torch.no_grad():
        cos_t, sin_t = hf_case.hf.model.rotary_emb(torch.zeros(1), torch.from_numpy(pos))
        hq, hk = hf_apply(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos_t, sin_t)
    cos, sin = rope_cos_sin(cfg, jnp.asarray(pos, jnp.int32))
    assert_close(cos, cos_t[..., : d // 2].numpy(), 1e-5, "rope cos (with attention factor)")
    assert_close(sin, sin_t[..., : d // 2].numpy(), 1e-5, "rope sin (with attention factor)")
    layout = "interleaved" if interleave else "halves"
    assert_close(apply_rope(jnp.asarray(q), cos, sin, interleave), hq.transpose(1, 2).numpy(), 1e-5, f"rotated q_pe ({layout})")
    assert_close(apply_rope(jnp.asarray(k), cos, sin, interleave), hk.transpose(1, 2).numpy(), 1e-5, f"rotated k_pe ({layout})")


def test_router_matches_hf(hf_case):
    """Top-k expert ids (exactly) and gate weights of every MoE layer, on the hidden states the
    router sees in a real forward, against DeepseekV3TopkRouter -- and the case exercises both
    the group limit and the correction bias (each changes some choices)."""
    from jaxmoe.config import ModelConfig
    from jaxmoe.model.router import route
    from jaxmoe.model.weights import RouterWeights

    cfg = ModelConfig.from_file(hf_case.jx_dir)
    ids = np.concatenate([hf_case.prompt, hf_case.prompt2])
    acts = H.capture(hf_case.hf, ids)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if f"router_in.{i}" in acts]
    assert moe_layers == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    group_matters = bias_matters = 0
    for i in moe_layers:
        gate = hf_case.hf.model.layers[i].mlp.gate
        x = acts[f"router_in.{i}"]
        with torch.no_grad():
            _, hf_w, hf_ids = gate(torch.from_numpy(x))
            no_group, no_bias = copy.deepcopy(gate), copy.deepcopy(gate)
            no_group.num_group = no_group.topk_group = 1
            no_bias.e_score_correction_bias.zero_()
            ids_ng, ids_nb = no_group(torch.from_numpy(x))[2], no_bias(torch.from_numpy(x))[2]
        rw = RouterWeights(jnp.asarray(gate.weight.detach().numpy()), jnp.asarray(gate.e_score_correction_bias.numpy()))
        got_ids, got_w = (np.asarray(a) for a in route(cfg, rw, jnp.asarray(x)))

        def canon(i_, w_):
            o = np.argsort(i_, -1)
            return np.take_along_axis(i_, o, -1), np.take_along_axis(w_, o, -1)

        want_ids, want_w = canon(hf_ids.numpy(), hf_w.numpy())
        got_ids, got_w = canon(got_ids, got_w)
        bad = np.nonzero((got_ids != want_ids).any(-1))[0]
        assert bad.size == 0, (
            f"layer {i}: router picks different experts for {bad.size}/{len(x)} tokens; token {bad[0]}: "
            f"jaxmoe {got_ids[bad[0]].tolist()} vs transformers {want_ids[bad[0]].tolist()}")
        assert_close(got_w, want_w, 1e-6, f"layer {i}: router gate weights")
        group_matters += int((np.sort(ids_ng.numpy(), -1) != want_ids).any(-1).sum())
        bias_matters += int((np.sort(ids_nb.numpy(), -1) != want_ids).any(-1).sum())
    assert group_matters > 0, "test case too easy: the group limit never changes a choice"
    assert bias_matters > 0, "test case too easy: e_score_correction_bias never changes a choice"


def test_blocks_match_hf(case):
    """Each block of each layer on transformers' own inputs (so errors do not compound): MLA
    (prefill form), the dense MLP / MoE block (router + routed + shared experts), and the final
    norm + lm_head. The first failing block is the one to look at; if all pass and the
    whole-model tests fail, the residual/norm wiring between blocks is at fault."""
    from jaxmoe.model.forward import final_logits
    from jaxmoe.model.mla import mla_expanded
    from jaxmoe.model.moe import mlp, moe
    from jaxmoe.model.rope import rope_cos_sin
    from jaxmoe.model.weights import MoEWeights

    cfg, w = case.cfg, case.weights
    acts = H.capture(case.hf, case.prompt)
    pos = _positions(1, PROMPT_LEN)
    cos, sin = rope_cos_sin(cfg, pos)
    # jit'd with the layer index traced: one compile per block type, not per layer
    attn = jax.jit(lambda lw, x, layer: mla_expanded(cfg, lw, x, new_cache(cfg, 1), layer, pos, cos, sin)[0])
    ffn = jax.jit(lambda m, x: moe(cfg, m, x) if isinstance(m, MoEWeights) else mlp(m, x))
    errs = []
    for i, lw in enumerate(w.layers):
        out = attn(lw.self_attn, jnp.asarray(acts[f"attn_in.{i}"]), i)
        errs.append(assert_close(out, acts[f"attn_out.{i}"], TOL, f"layer {i}: MLA attention output"))
        is_moe = isinstance(lw.mlp, MoEWeights)
        assert is_moe == cfg.is_moe_layer(i), f"layer {i}: loaded {'MoE' if is_moe else 'dense'} weights"
        out = ffn(lw.mlp, jnp.asarray(acts[f"mlp_in.{i}"]))
        name = "MoE (router + routed + shared experts)" if is_moe else "dense MLP"
        errs.append(assert_close(out, acts[f"mlp_out.{i}"], TOL, f"layer {i}: {name} output"))
    out = final_logits(cfg, w, jnp.asarray(acts[f"hidden.{cfg.num_hidden_layers}"]))
    errs.append(assert_close(out, H.logits(case.hf, case.prompt), TOL, "final norm + lm_head"))
    print(f"[{case.name}] blocks: max abs error {max(errs):.3g}")


# ==== whole model ============================================================================


def test_prefill_logits_match_hf(case):
    """Logits over a 40-token prompt (prefill: expanded latent KV) vs transformers, max abs <= 1e-4."""
    got, _ = jx_prefill(case.cfg, case.weights, case.prompt)
    want = H.logits(case.hf, case.prompt)
    assert np.abs(want).max() > 1.0, "reference logits are near zero: the test would prove little"
    err = assert_close(got, want, TOL, f"[{case.name}] prefill logits")
    print(f"[{case.name}] prefill logits max abs error {err:.3g}")


def test_greedy_continuation_matches_hf(case):
    """32 greedy tokens (jaxmoe: prefill then one absorbed-MLA decode step per token over the
    latent cache; transformers: its own KV cache) are identical, and so are the logits each
    token was chosen from."""
    toks, step_logits, _ = case.jx_greedy
    hf_toks, hf_step = case.hf_greedy
    if not np.array_equal(toks, hf_toks):
        i = int(np.argmax(toks[0] != hf_toks[0]))
        top2 = np.sort(hf_step[0, i])[-2:]
        pytest.fail(f"[{case.name}] greedy continuation diverges at new token {i}: jaxmoe {toks[0, i]} vs "
                    f"transformers {hf_toks[0, i]} (transformers' top-2 margin there {top2[1] - top2[0]:.3g}); "
                    f"jaxmoe {toks[0].tolist()}\n transformers {hf_toks[0].tolist()}")
    assert len(set(hf_toks[0].tolist())) > 4, "degenerate reference continuation"
    err = assert_close(step_logits, hf_step, TOL, f"[{case.name}] per-step logits of the greedy continuation")
    print(f"[{case.name}] greedy: 32/32 tokens equal, step logits max abs error {err:.3g}")


def test_decode_equals_full_recompute(case):
    """The logits of every cached decode step equal a full prefill over the whole sequence
    (jaxmoe's own, and transformers'), and the latent cache decode leaves behind equals the one
    a full prefill writes."""
    toks, step_logits, cache = case.jx_greedy
    seq = np.concatenate([case.prompt, toks[:, :-1]], 1)  # every token that was fed in
    full, full_cache = jx_prefill(case.cfg, case.weights, seq)
    rows = slice(PROMPT_LEN - 1, seq.shape[1])
    e1 = assert_close(step_logits, full[:, rows], TOL, f"[{case.name}] decode-step logits vs jaxmoe full prefill")
    e2 = assert_close(step_logits, H.logits(case.hf, seq)[:, rows], TOL,
                      f"[{case.name}] decode-step logits vs transformers full forward")
    n = seq.shape[1]
    assert_close(cache.c_kv[:, :, :n], full_cache.c_kv[:, :, :n], 1e-5, f"[{case.name}] c_kv after decode vs prefill")
    assert_close(cache.k_pe[:, :, :n], full_cache.k_pe[:, :, :n], 1e-5, f"[{case.name}] k_pe after decode vs prefill")
    assert not np.any(np.asarray(cache.c_kv[:, :, n:])), "decode wrote past the last fed position"
    print(f"[{case.name}] decode vs full recompute: {e1:.3g} (jaxmoe), {e2:.3g} (transformers)")


def test_chunked_prefill_matches_hf(qlora):
    """An 80-token sequence run as two 40-token chunks over the cache -- each chunk through
    `prefill` (expanded) and through `decode` (absorbed MLA, T > 1, as the engine's chunked
    steps do) -- gives transformers' logits over the whole sequence: the causal mask holds
    within a chunk and at an offset, and both paths write the same latents."""
    _, decode = jitted()
    cfg, w = qlora.cfg, qlora.weights
    seq = np.concatenate([qlora.prompt, qlora.prompt2], 1)
    want = H.logits(qlora.hf, seq)
    first, second = slice(0, PROMPT_LEN), slice(PROMPT_LEN, 2 * PROMPT_LEN)
    pos = np.arange(2 * PROMPT_LEN, dtype=np.int32)[None]

    got, cache = jx_prefill(cfg, w, seq[:, first])
    assert_close(got, want[:, first], TOL, "chunk 1 via prefill (expanded)")
    got_abs, cache_abs = decode(cfg, w, new_cache(cfg, 1), jnp.asarray(seq[:, first], jnp.int32), jnp.asarray(pos[:, first]))
    assert_close(got_abs, want[:, first], TOL, "chunk 1 via decode (absorbed)")
    assert_close(cache_abs.c_kv, cache.c_kv, 1e-5, "c_kv written by the absorbed vs the expanded path")
    assert_close(cache_abs.k_pe, cache.k_pe, 1e-5, "k_pe written by the absorbed vs the expanded path")

    got, _ = jx_prefill(cfg, w, seq[:, second], pos[:, second], cache=cache)
    assert_close(got, want[:, second], TOL, "chunk 2 via prefill (expanded) over the cached chunk 1")
    got, _ = decode(cfg, w, cache, jnp.asarray(seq[:, second], jnp.int32), jnp.asarray(pos[:, second]))
    assert_close(got, want[:, second], TOL, "chunk 2 via decode (absorbed) over the cached chunk 1")


def test_batch_of_two_equals_each_alone(qlora):
    """Two different prompts in one batch: the same logits and greedy tokens as each run alone."""
    cfg, w = qlora.cfg, qlora.weights
    both = np.concatenate([qlora.prompt, qlora.prompt2])
    toks, step, _ = jx_greedy(cfg, w, both, NEW_TOKENS)
    for row, prompt in enumerate((qlora.prompt, qlora.prompt2)):
        alone_toks, alone_step, _ = qlora.jx_greedy if row == 0 else jx_greedy(cfg, w, prompt, NEW_TOKENS)
        assert np.array_equal(toks[row], alone_toks[0]), f"batch row {row}: tokens differ from the prompt alone"
        assert_close(step[row], alone_step[0], TOL, f"batch row {row}: step logits vs the prompt alone")
    assert not np.array_equal(toks[0], toks[1])


def test_ragged_batch_equals_each_alone(qlora):
    """A batch of a 40-token and a 27-token prompt (right-padded; padding at position max_len is
    neither cached nor attended), decoded together with per-row positions: each row gives what
    transformers gives for that prompt alone."""
    cfg, w = qlora.cfg, qlora.weights
    short = 27
    padded = qlora.prompt2.copy()
    padded[:, short:] = 7  # junk that must not leak into row 1
    both = np.concatenate([qlora.prompt, padded])
    toks, step, cache = jx_greedy(cfg, w, both, NEW_TOKENS, lengths=np.array([PROMPT_LEN, short]))
    for row, prompt in enumerate((qlora.prompt, qlora.prompt2[:, :short])):
        hf_toks, hf_step = qlora.hf_greedy if row == 0 else H.greedy(qlora.hf, prompt, NEW_TOKENS)
        assert np.array_equal(toks[row], hf_toks[0]), (
            f"ragged batch row {row}: tokens {toks[row].tolist()} != transformers alone {hf_toks[0].tolist()}")
        assert_close(step[row], hf_step[0], TOL, f"ragged batch row {row}: step logits vs transformers alone")
    written = short + NEW_TOKENS - 1
    assert not np.any(np.asarray(cache.c_kv[:, 1, written:])), "row 1: cache written past its last position"
    pos = np.where(np.arange(PROMPT_LEN) < short, np.arange(PROMPT_LEN), MAX_LEN)
    _, prefilled = jx_prefill(cfg, w, both, np.stack([np.arange(PROMPT_LEN), pos]))
    for name in ("c_kv", "k_pe"):
        assert not np.any(np.asarray(getattr(prefilled, name)[:, 1, short:])), f"padding tokens were written to {name}"


# ==== FP8 ====================================================================================


def test_fp8_weights_stay_fp8(fp8):
    """jaxmoe keeps the checkpoint's e4m3 values and block scales (no dequantized copy), and the
    case really has partial 128x128 edge blocks in both dimensions."""
    from jaxmoe.quant import Fp8Weight

    w = fp8.weights
    linears = []
    for lw in w.layers:
        a = lw.self_attn
        linears += [x for x in (a.q_a_proj, a.q_b_proj, a.q_proj, a.kv_a_proj_with_mqa, a.kv_b_proj, a.o_proj) if x is not None]
        mlps = [lw.mlp] if not hasattr(lw.mlp, "gate") else [lw.mlp.experts, lw.mlp.shared_experts]
        linears += [getattr(m, k) for m in mlps for k in ("gate_proj", "up_proj", "down_proj")]
    partial_both = 0
    for lin in linears:
        assert isinstance(lin, Fp8Weight), f"expected Fp8Weight, got {type(lin).__name__} {getattr(lin, 'shape', '')}"
        assert lin.weight.dtype == jnp.float8_e4m3fn
        n, k = lin.weight.shape[-2:]
        assert lin.weight_scale_inv.shape[-2:] == (-(-n // 128), -(-k // 128)), (lin.weight.shape, lin.weight_scale_inv.shape)
        partial_both += n > 128 and k > 128 and n % 128 != 0 and k % 128 != 0
    assert partial_both >= 3, "FP8 case lacks matrices with partial edge blocks in both dimensions"
    assert not isinstance(w.lm_head, Fp8Weight) and w.embed_tokens.dtype == jnp.float32


def test_fp8_quantization_is_visible(fp8):
    """The FP8 comparison can fail: quantization moves transformers' logits by far more than the
    tolerance, and jaxmoe reading FP8 matches the dequantized weights, not the original ones."""
    original = H.logits(fp8.extra["unquantized"], fp8.prompt)
    dequantized = H.logits(fp8.hf, fp8.prompt)
    shift = np.abs(original - dequantized).max()
    assert shift > 100 * TOL, f"quantization moved logits by only {shift:.3g}"
    got, _ = jx_prefill(fp8.cfg, fp8.weights, fp8.prompt)
    assert np.abs(got - original).max() > 100 * TOL
    print(f"FP8 quantization shifts logits by up to {shift:.3g} (tolerance {TOL:g})")
