"""The whole model as a pure function of (weights, cache, tokens, positions).

`forward_expanded` and `forward_absorbed` differ only in the form MLA attends in (keys and
values expanded, or kv_b_proj absorbed into queries and outputs; see mla.py and
`step_shapes.attention_form`); both read and write the same latent cache and give the same
logits. `cfg` is static: jit them with `jax.jit(forward_absorbed, static_argnums=0)`.
Activations take the embedding's dtype.

tokens, positions: int32 [B, T]. A position >= cache.max_len marks a padding token: it is
computed but neither stored in the cache nor seen by other tokens.
`logit_index` [B] (optional): return logits [B, 1, V] at that index of each row only.
`kv_len` (optional, static): attend over the first kv_len cache slots only -- every real
token's position must be below it; None = the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, write_layer
from jaxmoe.model.mla import attend_expanded, mla_absorbed, mla_expanded, mla_latents
from jaxmoe.model.moe import mlp, moe_prologue, routed_experts
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.rope import rope_cos_sin
from jaxmoe.model.weights import LayerWeights, MoEWeights, Weights
from jaxmoe.quant import linear
from jaxmoe.step_shapes import AttentionForm, attention_form


def attention_block(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions, cos, sin, *,
                    form: AttentionForm, kv_len=None):
    """x + MLA(input_layernorm(x)) -> (x, post_attention_layernorm'd x for the MLP, cache)."""
    attend = {"absorbed": mla_absorbed, "expanded": mla_expanded}[form]
    normed = rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps)
    h, cache = attend(cfg, lw.self_attn, normed, cache, layer, positions, cos, sin, kv_len)
    x = x + h
    return x, rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps), cache


def layer_until_experts(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions, cos, sin, *,
                        form: AttentionForm, kv_len=None):
    """One layer up to its routed experts -- what runs beside them on the accelerator.

    Dense layer: (x + attention + MLP, None, cache). MoE layer: (x + attention, (h [N, H],
    topk ids, topk weights, shared experts' output), cache): the layer's output is then
    x + routed_experts(h, ids, weights) + shared. Padding tokens (position >= cache length)
    route to no expert.
    """
    x, h, cache = attention_block(cfg, lw, x, cache, layer, positions, cos, sin, form=form, kv_len=kv_len)
    x, moe_in = mlp_until_experts(cfg, lw, x, h, positions < cache.max_len)
    return x, moe_in, cache


def mlp_until_experts(cfg: ModelConfig, lw: LayerWeights, x, h, real):
    """The per-token part after attention: dense layer -> (x + MLP(h), None); MoE layer -> (x,
    (h [N, H], topk ids, topk weights, shared experts' output)). real [B, T]: tokens that route
    (padding routes to no expert)."""
    if not isinstance(lw.mlp, MoEWeights):
        return x + mlp(lw.mlp, h), None
    flat = h.reshape(-1, h.shape[-1])
    ids, weights, shared = moe_prologue(cfg, lw.mlp, flat, real.reshape(-1))
    return x, (flat, ids, weights, shared)


def stage_layer(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions, kv_len: int):
    """`layer_until_experts` in the attention form of the step's width and key window
    (`step_shapes.attention_form`), with the rotary tables of `positions`: the staged
    executor's layer on the accelerator."""
    cos, sin = rope_cos_sin(cfg, positions)
    return layer_until_experts(cfg, lw, x, cache, layer, positions, cos, sin,
                               form=attention_form(cfg, x.shape[1], kv_len), kv_len=kv_len)


def prefill_layer(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions):
    """`layer_until_experts` with expanded attention over the whole cache: the streamed
    prefill's layer (streaming.slp; prompt chunks are wide)."""
    cos, sin = rope_cos_sin(cfg, positions)
    return layer_until_experts(cfg, lw, x, cache, layer, positions, cos, sin, form="expanded")


def split_layer(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions, mine, gather):
    """`prefill_layer` for one share of a chunk's tokens (sequence-split attention,
    streaming/sequence_split.py): x, mine [B, T/n, ...] are the share's activations and
    positions, positions [B, T] the whole chunk's. The share's new latents go through
    `gather` (an all-gather over the sequence) so the whole chunk's are written, then the
    share's queries attend (expanded) over the cache. -> (x, moe_in or None, cache) as
    `layer_until_experts`, for the share's tokens."""
    cos, sin = rope_cos_sin(cfg, mine)
    normed = rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps)
    c_kv, k_pe = mla_latents(cfg, lw.self_attn, normed, cos, sin)
    cache = write_layer(cache, layer, positions, gather(c_kv), gather(k_pe))
    x = x + attend_expanded(cfg, lw.self_attn, normed, cache, layer, mine, cos, sin)
    x, moe_in = mlp_until_experts(cfg, lw, x, rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps),
                                  mine < cache.max_len)
    return x, moe_in, cache


def decoder_layer(cfg: ModelConfig, lw: LayerWeights, x, cache: KVCache, layer, positions, cos, sin, *,
                  form: AttentionForm, kv_len=None):
    x, h, cache = attention_block(cfg, lw, x, cache, layer, positions, cos, sin, form=form, kv_len=kv_len)
    return mlp_block(cfg, lw, x, h, positions < cache.max_len), cache


def mlp_block(cfg: ModelConfig, lw: LayerWeights, x, h, real):
    """x + the layer's MLP of h (post_attention_layernorm'd x): dense, or shared + routed experts."""
    x, moe_in = mlp_until_experts(cfg, lw, x, h, real)
    if moe_in is None:
        return x
    flat, ids, weights, shared = moe_in
    return x + (routed_experts(lw.mlp.experts, flat, ids, weights) + shared).reshape(x.shape)


def final_logits(cfg: ModelConfig, weights: Weights, x, logit_index=None) -> jax.Array:
    """Final norm and lm_head (only at `logit_index` [B] of each row when given) -> float32 logits."""
    if logit_index is not None:
        x = x[jnp.arange(x.shape[0]), jnp.asarray(logit_index, jnp.int32)][:, None]
    x = rms_norm(x, weights.norm, cfg.rms_norm_eps)
    return linear(x, weights.lm_head).astype(jnp.float32)


def _forward(cfg: ModelConfig, weights: Weights, cache: KVCache, tokens, positions, *, form: AttentionForm,
             logit_index=None, kv_len=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = weights.embed_tokens[tokens]
    cos, sin = rope_cos_sin(cfg, positions)
    for i, lw in enumerate(weights.layers):
        x, cache = decoder_layer(cfg, lw, x, cache, i, positions, cos, sin, form=form, kv_len=kv_len)
    return final_logits(cfg, weights, x, logit_index), cache


def forward_expanded(cfg: ModelConfig, weights: Weights, cache: KVCache, tokens, positions, *, logit_index=None,
                     kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32) for a chunk of tokens, attending with expanded K/V."""
    return _forward(cfg, weights, cache, tokens, positions, form="expanded", logit_index=logit_index, kv_len=kv_len)


def forward_absorbed(cfg: ModelConfig, weights: Weights, cache: KVCache, tokens, positions, *, logit_index=None,
                     kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32), attending in latent space (absorbed up-projections)."""
    return _forward(cfg, weights, cache, tokens, positions, form="absorbed", logit_index=logit_index, kv_len=kv_len)
