"""Multi-head Latent Attention over the compressed latent cache.

Per token, the cache keeps only c_kv (kv_a_layernorm'd, kv_lora_rank wide) and the rotated
shared rope key k_pe. Two ways to attend, mathematically equal:

- `mla_prefill` expands the cached latents through kv_b_proj into per-head keys and values
  (cheaper when many queries share the expansion: prompts);
- `mla_decode` absorbs kv_b_proj into the query (q_nope @ W_UK) and the output
  (o_latent @ W_UV) and attends in latent space (cheaper per token: decode), as DeepSeek's
  own inference does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, write_layer
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.rope import apply_rope
from jaxmoe.model.weights import MLAWeights
from jaxmoe.quant import dequantize, linear


def _queries(cfg: ModelConfig, w: MLAWeights, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
    """x [B, T, H] -> (q_nope [B, T, h, nope], q_pe [B, T, h, rope] rotated)."""
    if w.q_proj is not None:
        q = linear(x, w.q_proj)
    else:
        q = linear(rms_norm(linear(x, w.q_a_proj), w.q_a_layernorm, cfg.rms_norm_eps), w.q_b_proj)
    q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
    return q_nope, apply_rope(q_pe, cos, sin, cfg.rope_interleave)


def _write_latents(cfg, w, x, cache, layer, positions, cos, sin) -> KVCache:
    kv = linear(x, w.kv_a_proj_with_mqa)
    c_kv = rms_norm(kv[..., : cfg.kv_lora_rank], w.kv_a_layernorm, cfg.rms_norm_eps)
    k_pe = apply_rope(kv[..., cfg.kv_lora_rank :], cos, sin, cfg.rope_interleave)
    return write_layer(cache, layer, positions, c_kv, k_pe)


def _softmax(cfg: ModelConfig, scores: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal softmax over cache slots: key slot s is visible to a query at position p iff s <= p.

    scores [B, T, h, S] (already scaled); positions [B, T].
    """
    s = scores.shape[-1]
    visible = jnp.arange(s)[None, None, None, :] <= positions[:, :, None, None]
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def _cached(cache: KVCache, layer, kv_len: int | None, dtype):
    """The layer's latents over the first `kv_len` slots (all when None): [B, S, r], [B, S, rope]."""
    c_kv, k_pe = cache.c_kv[layer], cache.k_pe[layer]
    if kv_len is not None:
        c_kv, k_pe = c_kv[:, :kv_len], k_pe[:, :kv_len]
    return c_kv.astype(dtype), k_pe.astype(dtype)


def mla_prefill(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None):
    """Attention with expanded keys/values. Returns (out [B, T, H], cache with the new latents).

    `kv_len` (static): attend over the first kv_len cache slots only (every visible position
    must be below it); None = the whole cache.
    """
    q_nope, q_pe = _queries(cfg, w, x, cos, sin)
    cache = _write_latents(cfg, w, x, cache, layer, positions, cos, sin)
    c_kv, k_pe = _cached(cache, layer, kv_len, x.dtype)
    kv = linear(c_kv, w.kv_b_proj).reshape(*c_kv.shape[:2], cfg.num_attention_heads, -1)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]
    scores = jnp.einsum("bthd,bshd->bths", q_nope, k_nope) + jnp.einsum("bthd,bsd->bths", q_pe, k_pe)
    p = _softmax(cfg, scores * cfg.softmax_scale, positions).astype(x.dtype)
    out = jnp.einsum("bths,bshd->bthd", p, v)
    return linear(out.reshape(*x.shape[:2], -1), w.o_proj), cache


def _split_kv_b(kv_b_proj, cfg, dtype) -> tuple[jax.Array, jax.Array]:
    """kv_b_proj [h*(nope+v), r] -> (W_UK [h, nope, r], W_UV [h, v, r])."""
    w_kv = dequantize(kv_b_proj, dtype).reshape(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
    return w_kv[:, : cfg.qk_nope_head_dim], w_kv[:, cfg.qk_nope_head_dim :]


@functools.singledispatch
def absorb_q(kv_b_proj, q_nope: jax.Array, cfg: ModelConfig) -> jax.Array:
    """q_nope [B, T, h, nope] -> q_latent [B, T, h, r] = q_nope @ W_UK (per head). Weight
    formats with their own kernels (cpu_ext) register on this and on `absorb_out`."""
    w_uk, _ = _split_kv_b(kv_b_proj, cfg, q_nope.dtype)
    return jnp.einsum("bthd,hdr->bthr", q_nope, w_uk)


@functools.singledispatch
def absorb_out(kv_b_proj, o_latent: jax.Array, cfg: ModelConfig) -> jax.Array:
    """o_latent [B, T, h, r] -> per-head values [B, T, h, v] = o_latent @ W_UV^T."""
    _, w_uv = _split_kv_b(kv_b_proj, cfg, o_latent.dtype)
    return jnp.einsum("bthr,hvr->bthv", o_latent, w_uv)


def mla_decode(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None):
    """Attention in latent space with kv_b_proj absorbed. Same contract as `mla_prefill`."""
    q_nope, q_pe = _queries(cfg, w, x, cos, sin)
    cache = _write_latents(cfg, w, x, cache, layer, positions, cos, sin)
    c_kv, k_pe = _cached(cache, layer, kv_len, x.dtype)
    q_latent = absorb_q(w.kv_b_proj, q_nope, cfg)
    scores = jnp.einsum("bthr,bsr->bths", q_latent, c_kv) + jnp.einsum("bthd,bsd->bths", q_pe, k_pe)
    p = _softmax(cfg, scores * cfg.softmax_scale, positions).astype(x.dtype)
    o_latent = jnp.einsum("bths,bsr->bthr", p, c_kv)
    out = absorb_out(w.kv_b_proj, o_latent, cfg)
    return linear(out.reshape(*x.shape[:2], -1), w.o_proj), cache
