"""The decoder of the grouped-query-attention families (Qwen3-MoE, GLM-4.5) as a pure function
of (weights, cache, tokens, positions); each family brings its sparse-MoE block.

Same contract as jaxmoe.model.forward: `cfg` is static (jit with `static_argnums=0`),
activations take the embedding's dtype, logits are float32.

tokens, positions: int32 [B, T]. A position >= cache.max_len marks a padding token: it is
computed but neither stored in the cache nor seen by other tokens, and routes to no expert.
`logit_index` [B] (optional): return logits [B, 1, V] at that index of each row only.
`kv_len` (optional, static): attend over the first kv_len cache slots only -- every real
token's position must be below it; None = the whole cache.

Per layer: x + GQA(input_layernorm(x)), then x + MLP(post_attention_layernorm(x)): a dense
SwiGLU MLP where the layer's `mlp` is `MLPWeights`, else the sparse-MoE block: the family's
`moe_prologue(cfg, mlp, h [N, H], valid [N]) -> (topk ids, topk weights, shared experts'
output)` (its router, and its shared experts or zeros), then the routed experts
(`model.moe.routed_experts`) plus that shared output. `stage_layer` is one layer up to its
routed experts, for the staged executor (routed experts on the host, the rest on an
accelerator), `split_layer` the same for one share of a chunk's tokens (sequence-split DSLP).
The config carries `attention` (GQAConfig), `rms_norm_eps`, `num_hidden_layers` and
`max_position_embeddings`; the weights `embed_tokens`, `layers`, `norm` and `lm_head`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.layers.gqa import attend, gqa, gqa_qkv, init_gqa_cache, rope_cos_sin
from jaxmoe.model.cache import KVCache, write_layer
from jaxmoe.model.forward import final_logits
from jaxmoe.model.groups import GroupLayer, run_groups
from jaxmoe.model.moe import mlp, routed_experts
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.weights import MLPWeights

# moe_prologue(cfg, the layer's MoE weights, x [N, H], valid [N] or None) -> (topk ids [N, k],
# topk weights [N, k], shared experts' output [N, H]); padding (valid False) gets ids -1, weight 0
MoePrologue = Callable[[Any, Any, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array, jax.Array]]


def init_cache(cfg: Any, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions (keys in `c_kv`,
    values in `k_pe`, [L, batch, max_len, kv_heads * head_dim] each)."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"cache max_len {max_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return init_gqa_cache(cfg.num_hidden_layers, cfg.attention, batch, max_len, dtype)


def sparse_moe(cfg: Any, prologue: MoePrologue, w: Any, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The sparse-MoE block of x [..., H]: routed experts plus the prologue's shared output;
    `valid` [...] marks real tokens (padding runs no routed expert)."""
    flat = x.reshape(-1, x.shape[-1])
    ids, weights, shared = prologue(cfg, w, flat, None if valid is None else valid.reshape(-1))
    return (routed_experts(w.experts, flat, ids, weights) + shared).reshape(x.shape)


def layer_until_experts(cfg: Any, prologue: MoePrologue, lw: Any, x, cache: KVCache, layer: int, positions, cos, sin,
                        kv_len: int | None = None, block: int | None = None):
    """One layer up to its routed experts. Dense layer: (x + attention + MLP, None, cache); MoE
    layer: (x + attention, (h [N, H], topk ids, topk weights, shared output), cache), whose output
    is then x + routed_experts(h, ids, weights) + shared. Padding routes to no expert."""
    h, cache = gqa(cfg.attention, lw.self_attn, rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps), cache, layer,
                   positions, cos, sin, kv_len, block)
    x, moe_in = _mlp_until_experts(cfg, prologue, lw, x + h, positions < cache.max_len)
    return x, moe_in, cache


def _mlp_until_experts(cfg: Any, prologue: MoePrologue, lw: Any, x, real):
    """After attention: dense layer -> (x + MLP, None); MoE layer -> (x, (h [N, H], topk ids,
    topk weights, shared output)). real [B, T]: the tokens that route."""
    h = rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps)
    if isinstance(lw.mlp, MLPWeights):
        return x + mlp(lw.mlp, h), None
    flat = h.reshape(-1, h.shape[-1])
    ids, weights, shared = prologue(cfg, lw.mlp, flat, real.reshape(-1))
    return x, (flat, ids, weights, shared)


def split_layer(cfg: Any, prologue: MoePrologue, lw: Any, x, cache: KVCache, layer: int, positions, mine, gather):
    """`stage_layer` (kv_len None) for one share of a chunk's tokens (sequence-split attention,
    streaming/sequence_split.py): x, mine [B, T/n, ...] are the share's activations and positions,
    positions [B, T] the whole chunk's. The share's new keys and values go through `gather` (an
    all-gather over the sequence) so the whole chunk's are written, then the share's queries
    attend over the cache. -> (x, moe_in or None, cache) for the share's tokens."""
    c = cfg.attention
    cos, sin = rope_cos_sin(c, mine)
    q, k, v = gqa_qkv(c, lw.self_attn, rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps), cos, sin)
    b, t = x.shape[:2]
    cache = write_layer(cache, layer, positions, gather(k.reshape(b, t, -1)), gather(v.reshape(b, t, -1)))
    x, moe_in = _mlp_until_experts(cfg, prologue, lw, x + attend(c, lw.self_attn, q, cache, layer, mine),
                                   mine < cache.max_len)
    return x, moe_in, cache


def stage_layer(cfg: Any, prologue: MoePrologue, lw: Any, x, cache: KVCache, layer: int, positions,
                kv_len: int | None = None):
    """`layer_until_experts` with the rotary tables of `positions`: the staged executor's layer
    (over kv_len keys) and the streamed prefill's (kv_len None: the whole prefill cache)."""
    cos, sin = rope_cos_sin(cfg.attention, positions)
    return layer_until_experts(cfg, prologue, lw, x, cache, layer, positions, cos, sin, kv_len)


def decoder_layer(cfg: Any, prologue: MoePrologue, lw: Any, x, cache: KVCache, layer: int, positions, cos, sin,
                  kv_len: int | None = None, block: int | None = None):
    """One decoder layer: -> (x, cache with the layer's new keys and values)."""
    x, moe_in, cache = layer_until_experts(cfg, prologue, lw, x, cache, layer, positions, cos, sin, kv_len, block)
    return _with_experts(lw, x, moe_in), cache


def mlp_block(cfg: Any, prologue: MoePrologue, lw: Any, x, real):
    """x + the layer's MLP of post_attention_layernorm(x): dense, or routed (+ shared) experts."""
    return _with_experts(lw, *_mlp_until_experts(cfg, prologue, lw, x, real))


def _with_experts(lw: Any, x, moe_in):
    """x, plus the routed and shared experts' output where the layer is MoE (moe_in not None)."""
    if moe_in is None:
        return x
    flat, ids, weights, shared = moe_in
    return x + (routed_experts(lw.mlp.experts, flat, ids, weights) + shared).reshape(x.shape)


def forward_groups(cfg: Any, prologue: MoePrologue, weights: Any, cache: KVCache, groups, kv_lens):
    """One step over row groups of different widths and key windows (`model.groups.run_groups`:
    the fused executor's decode rows beside a narrow prompt chunk), group g over `kv_lens[g]`
    keys. -> (logits [sum B_g, 1, V] at each row's logit_index; cache)."""
    c = cfg.attention

    def write(lw, x, cache, layer, positions, rope):
        q, k, v = gqa_qkv(c, lw.self_attn, rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps), *rope)
        b, t = x.shape[:2]
        return write_layer(cache, layer, positions, k.reshape(b, t, -1), v.reshape(b, t, -1)), q

    def attend_group(lw, x, q, cache, layer, positions, rope, g):
        return x + attend(c, lw.self_attn, q, cache, layer, positions, kv_lens[g])

    def mlp_of(lw, x, real):
        return mlp_block(cfg, prologue, lw, x, real)

    return run_groups(cfg, weights, cache, groups, GroupLayer(lambda p: rope_cos_sin(c, p), write, attend_group, mlp_of))


def forward(cfg: Any, prologue: MoePrologue, weights: Any, cache: KVCache, tokens, positions, logit_index=None,
            kv_len=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32; [B, 1, V] with logit_index) for a chunk of tokens, and the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = weights.embed_tokens[tokens]
    cos, sin = rope_cos_sin(cfg.attention, positions)
    for i, lw in enumerate(weights.layers):
        x, cache = decoder_layer(cfg, prologue, lw, x, cache, i, positions, cos, sin, kv_len)
    return final_logits(cfg, weights, x, logit_index), cache
