"""The Qwen3-MoE model as a pure function of (weights, cache, tokens, positions): the GQA
decoder of `jaxmoe.layers.gqa_decoder` (its contract: static `cfg`, padding positions,
`logit_index`, `kv_len`) with Qwen3-MoE's sparse block.

Per layer: x + GQA(input_layernorm(x)) (per-head q/k RMSNorm), then x +
MLP(post_attention_layernorm(x)) with a dense SwiGLU MLP or the sparse-MoE block (softmax top-k
router, routed experts, no shared expert).
"""

from __future__ import annotations

import jax

from jaxmoe.layers import gqa_decoder
from jaxmoe.layers.softmax_router import route_softmax
from jaxmoe.model.cache import KVCache
from jaxmoe.model.moe import routed_experts
from jaxmoe.models.qwen3_moe.config import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.weights import Qwen3MoeSparseMoeWeights, Qwen3MoeWeights

init_cache = gqa_decoder.init_cache


def sparse_moe(cfg: Qwen3MoeConfig, w: Qwen3MoeSparseMoeWeights, x: jax.Array, valid: jax.Array | None = None):
    """Routed experts (top-k of num_experts, softmax router) of x [..., H]; `valid` [...]
    marks real tokens (padding runs no expert)."""
    flat = x.reshape(-1, x.shape[-1])
    ids, weights = route_softmax(w.gate, flat, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                 None if valid is None else valid.reshape(-1))
    return routed_experts(w.experts, flat, ids, weights).reshape(x.shape)


def forward(cfg: Qwen3MoeConfig, weights: Qwen3MoeWeights, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    return gqa_decoder.forward(cfg, sparse_moe, weights, cache, tokens, positions, logit_index, kv_len)
