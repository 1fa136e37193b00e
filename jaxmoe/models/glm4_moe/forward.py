"""The GLM-4.5 model as a pure function of (weights, cache, tokens, positions).

Same contract as jaxmoe.model.forward and jaxmoe.models.qwen3_moe: `cfg` is static (jit with
`static_argnums=0`), activations take the embedding's dtype, logits are float32.

tokens, positions: int32 [B, T]. A position >= cache.max_len marks a padding token: it is
computed but neither stored in the cache nor seen by other tokens, and routes to no expert.
`logit_index` [B] (optional): return logits [B, 1, V] at that index of each row only.
`kv_len` (optional, static): attend over the first kv_len cache slots only -- every real
token's position must be below it; None = the whole cache.

Per layer: x + GQA(input_layernorm(x)) (q/k/v biases, optional per-head q/k RMSNorm before a
partial rotary in halves layout), then x + MLP(post_attention_layernorm(x)): a dense SwiGLU MLP
for the first `first_k_dense_replace` layers, else DeepSeek-V3's MoE block (`jaxmoe.model.moe.moe`:
sigmoid router with correction bias and group-limited top-k, routed experts scaled by
routed_scaling_factor, plus the shared experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.layers.gqa import gqa, init_gqa_cache, rope_cos_sin
from jaxmoe.model.cache import KVCache
from jaxmoe.model.forward import final_logits
from jaxmoe.model.moe import mlp, moe
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.weights import MoEWeights
from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.weights import Glm4MoeLayerWeights, Glm4MoeWeights


def init_cache(cfg: Glm4MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions (keys in `c_kv`,
    values in `k_pe`, [L, batch, max_len, kv_heads * head_dim] each)."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"cache max_len {max_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return init_gqa_cache(cfg.num_hidden_layers, cfg.attention, batch, max_len, dtype)


def sparse_moe(cfg: Glm4MoeConfig, w: MoEWeights, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Routed experts plus shared experts of x [..., H]; `valid` [...] marks real tokens (padding
    runs no routed expert). The router is jaxmoe.model.router.route, reading cfg's router fields."""
    return moe(cfg, w, x, valid)


def decoder_layer(cfg: Glm4MoeConfig, lw: Glm4MoeLayerWeights, x, cache: KVCache, layer: int, positions, cos, sin,
                  kv_len: int | None = None, block: int | None = None):
    """One decoder layer: -> (x, cache with the layer's new keys and values)."""
    h, cache = gqa(cfg.attention, lw.self_attn, rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps), cache, layer,
                   positions, cos, sin, kv_len, block)
    x = x + h
    h = rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps)
    if isinstance(lw.mlp, MoEWeights):
        return x + sparse_moe(cfg, lw.mlp, h, positions < cache.max_len), cache
    return x + mlp(lw.mlp, h), cache


def forward(cfg: Glm4MoeConfig, weights: Glm4MoeWeights, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = weights.embed_tokens[tokens]
    cos, sin = rope_cos_sin(cfg.attention, positions)
    for i, lw in enumerate(weights.layers):
        x, cache = decoder_layer(cfg, lw, x, cache, i, positions, cos, sin, kv_len)
    return final_logits(cfg, weights, x, logit_index), cache
