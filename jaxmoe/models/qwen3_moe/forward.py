"""The Qwen3-MoE model as a pure function of (weights, cache, tokens, positions): the GQA
decoder of `jaxmoe.layers.gqa_decoder` (its contract: static `cfg`, padding positions,
`logit_index`, `kv_len`) with Qwen3-MoE's sparse block.

Per layer: x + GQA(input_layernorm(x)) (per-head q/k RMSNorm), then x +
MLP(post_attention_layernorm(x)) with a dense SwiGLU MLP or the sparse-MoE block (softmax top-k
router, routed experts, no shared expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.layers import gqa_decoder
from jaxmoe.layers.softmax_router import route_softmax
from jaxmoe.model.cache import KVCache
from jaxmoe.models.qwen3_moe.config import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.weights import Qwen3MoeSparseMoeWeights, Qwen3MoeWeights

init_cache = gqa_decoder.init_cache


def moe_prologue(cfg: Qwen3MoeConfig, w: Qwen3MoeSparseMoeWeights, x: jax.Array, valid: jax.Array | None = None):
    """x [N, H] -> (topk ids, topk weights, zeros: no shared expert): the softmax top-k router."""
    ids, weights = route_softmax(w.gate, x, cfg.num_experts_per_tok, cfg.norm_topk_prob, valid)
    return ids, weights, jnp.zeros_like(x)


def sparse_moe(cfg: Qwen3MoeConfig, w: Qwen3MoeSparseMoeWeights, x: jax.Array, valid: jax.Array | None = None):
    """Routed experts (top-k of num_experts, softmax router) of x [..., H]; `valid` [...]
    marks real tokens (padding runs no expert)."""
    return gqa_decoder.sparse_moe(cfg, moe_prologue, w, x, valid)


def stage_layer(cfg: Qwen3MoeConfig, lw, x, cache: KVCache, layer: int, positions, kv_len: int | None = None):
    """One layer up to its routed experts (`gqa_decoder.stage_layer`): the staged executor's and,
    with kv_len None, the streamed prefill's."""
    return gqa_decoder.stage_layer(cfg, moe_prologue, lw, x, cache, layer, positions, kv_len)


def split_layer(cfg: Qwen3MoeConfig, lw, x, cache: KVCache, layer: int, positions, mine, gather):
    """`stage_layer` for one share of a chunk's tokens (`gqa_decoder.split_layer`: sequence-split DSLP)."""
    return gqa_decoder.split_layer(cfg, moe_prologue, lw, x, cache, layer, positions, mine, gather)


def forward(cfg: Qwen3MoeConfig, weights: Qwen3MoeWeights, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    return gqa_decoder.forward(cfg, moe_prologue, weights, cache, tokens, positions, logit_index, kv_len)


def forward_groups(cfg: Qwen3MoeConfig, weights: Qwen3MoeWeights, cache: KVCache, groups, *, kv_lens):
    """A narrow mixed step in one program (`gqa_decoder.forward_groups`)."""
    return gqa_decoder.forward_groups(cfg, moe_prologue, weights, cache, groups, kv_lens)
