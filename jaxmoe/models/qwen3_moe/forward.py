"""The Qwen3-MoE model as a pure function of (weights, cache, tokens, positions).

Same contract as jaxmoe.model.forward: `cfg` is static (jit with `static_argnums=0`),
activations take the embedding's dtype, logits are float32.

tokens, positions: int32 [B, T]. A position >= cache.max_len marks a padding token: it is
computed but neither stored in the cache nor seen by other tokens, and routes to no expert.
`logit_index` [B] (optional): return logits [B, 1, V] at that index of each row only.
`kv_len` (optional, static): attend over the first kv_len cache slots only -- every real
token's position must be below it; None = the whole cache.

Per layer: x + GQA(input_layernorm(x)), then x + MLP(post_attention_layernorm(x)) with a dense
SwiGLU MLP or the sparse-MoE block (softmax top-k router, routed experts, no shared expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.layers.gqa import gqa, init_gqa_cache, rope_cos_sin
from jaxmoe.layers.softmax_router import route_softmax
from jaxmoe.model.cache import KVCache
from jaxmoe.model.forward import final_logits
from jaxmoe.model.moe import mlp, routed_experts
from jaxmoe.model.norm import rms_norm
from jaxmoe.models.qwen3_moe.config import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.weights import Qwen3MoeLayerWeights, Qwen3MoeSparseMoeWeights, Qwen3MoeWeights


def init_cache(cfg: Qwen3MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions (keys in `c_kv`,
    values in `k_pe`, [L, batch, max_len, kv_heads * head_dim] each)."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"cache max_len {max_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return init_gqa_cache(cfg.num_hidden_layers, cfg.attention, batch, max_len, dtype)


def sparse_moe(cfg: Qwen3MoeConfig, w: Qwen3MoeSparseMoeWeights, x: jax.Array, valid: jax.Array | None = None):
    """Routed experts (top-k of num_experts, softmax router) of x [..., H]; `valid` [...]
    marks real tokens (padding runs no expert)."""
    flat = x.reshape(-1, x.shape[-1])
    ids, weights = route_softmax(w.gate, flat, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                 None if valid is None else valid.reshape(-1))
    return routed_experts(w.experts, flat, ids, weights).reshape(x.shape)


def decoder_layer(cfg: Qwen3MoeConfig, lw: Qwen3MoeLayerWeights, x, cache: KVCache, layer: int, positions, cos, sin,
                  kv_len: int | None = None, block: int | None = None):
    """One decoder layer: -> (x, cache with the layer's new keys and values)."""
    h, cache = gqa(cfg.attention, lw.self_attn, rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps), cache, layer,
                   positions, cos, sin, kv_len, block)
    x = x + h
    h = rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps)
    if isinstance(lw.mlp, Qwen3MoeSparseMoeWeights):
        return x + sparse_moe(cfg, lw.mlp, h, positions < cache.max_len), cache
    return x + mlp(lw.mlp, h), cache


def forward(cfg: Qwen3MoeConfig, weights: Qwen3MoeWeights, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = weights.embed_tokens[tokens]
    cos, sin = rope_cos_sin(cfg.attention, positions)
    for i, lw in enumerate(weights.layers):
        x, cache = decoder_layer(cfg, lw, x, cache, i, positions, cos, sin, kv_len)
    return final_logits(cfg, weights, x, logit_index), cache
