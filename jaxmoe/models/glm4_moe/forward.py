"""The GLM-4.5 model as a pure function of (weights, cache, tokens, positions): the GQA decoder
of `jaxmoe.layers.gqa_decoder` (its contract: static `cfg`, padding positions, `logit_index`,
`kv_len`) with DeepSeek-V3's MoE block.

Per layer: x + GQA(input_layernorm(x)) (q/k/v biases, optional per-head q/k RMSNorm before a
partial rotary in halves layout), then x + MLP(post_attention_layernorm(x)): a dense SwiGLU MLP
for the first `first_k_dense_replace` layers, else DeepSeek-V3's MoE block (`jaxmoe.model.moe.moe`:
sigmoid router with correction bias and group-limited top-k, routed experts scaled by
routed_scaling_factor, plus the shared experts).
"""

from __future__ import annotations

import jax

from jaxmoe.layers import gqa_decoder
from jaxmoe.model.cache import KVCache
from jaxmoe.model.moe import moe_prologue  # DeepSeek-V3's router and shared experts
from jaxmoe.model.weights import MoEWeights
from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.weights import Glm4MoeWeights

init_cache = gqa_decoder.init_cache


def sparse_moe(cfg: Glm4MoeConfig, w: MoEWeights, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Routed experts plus shared experts of x [..., H]; `valid` [...] marks real tokens (padding
    runs no routed expert). The router is jaxmoe.model.router.route, reading cfg's router fields."""
    return gqa_decoder.sparse_moe(cfg, moe_prologue, w, x, valid)


def stage_layer(cfg: Glm4MoeConfig, lw, x, cache: KVCache, layer: int, positions, kv_len: int | None = None):
    """One layer up to its routed experts (`gqa_decoder.stage_layer`): the staged executor's and,
    with kv_len None, the streamed prefill's."""
    return gqa_decoder.stage_layer(cfg, moe_prologue, lw, x, cache, layer, positions, kv_len)


def split_layer(cfg: Glm4MoeConfig, lw, x, cache: KVCache, layer: int, positions, mine, gather):
    """`stage_layer` for one share of a chunk's tokens (`gqa_decoder.split_layer`: sequence-split DSLP)."""
    return gqa_decoder.split_layer(cfg, moe_prologue, lw, x, cache, layer, positions, mine, gather)


def forward(cfg: Glm4MoeConfig, weights: Glm4MoeWeights, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    return gqa_decoder.forward(cfg, moe_prologue, weights, cache, tokens, positions, logit_index, kv_len)


def forward_groups(cfg: Glm4MoeConfig, weights: Glm4MoeWeights, cache: KVCache, groups, *, kv_lens):
    """A narrow mixed step in one program (`gqa_decoder.forward_groups`)."""
    return gqa_decoder.forward_groups(cfg, moe_prologue, weights, cache, groups, kv_lens)
