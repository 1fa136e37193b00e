"""Multi-head Latent Attention over the compressed latent cache.

Per token, the cache keeps only c_kv (kv_a_layernorm'd, kv_lora_rank wide) and the rotated
shared rope key k_pe. Two ways to attend, mathematically equal:

- `mla_expanded` expands the cached latents through kv_b_proj into per-head keys and values
  (cheaper when many queries share the expansion: prompts);
- `mla_absorbed` absorbs kv_b_proj into the query (q_nope @ W_UK) and the output
  (o_latent @ W_UV) and attends in latent space (cheaper per token: decode), as DeepSeek's
  own inference does.

Both attend blocked over the keys when a step has several queries (a prompt chunk) and more
than `block` cache slots (default `step_shapes.attention_key_block`, static): an online softmax (running
max and sum, flash-style) in float32 over key blocks with `lax.fori_loop`, so scores take
O(T x block) per head instead of O(T x S) -- a 32K prompt fits -- and, in the expanded form,
keys and values are expanded from the latents one block at a time. The loop stops after the
last block any query reaches (a traced trip count), so a chunk costs the keys up to its last
position rather than its whole power-of-two key window. One query per row (decode) attends in
one piece.

Each form is also split in two, "write latents" (`mla_latents`, then `cache.write_layer`)
and "attend" (`attend_expanded` / `attend_absorbed`, over the cache as written), so a
sequence split (streaming/sequence_split.py) can write the whole chunk's latents and attend
for its share of the queries only; `mla_*` is exactly the two in a row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, read_layer, write_layer
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.rope import apply_rope
from jaxmoe.model.weights import MLAWeights
from jaxmoe.quant import dequantize, linear
from jaxmoe.step_shapes import attention_key_block


def _queries(cfg: ModelConfig, w: MLAWeights, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
    """x [B, T, H] -> (q_nope [B, T, h, nope], q_pe [B, T, h, rope] rotated)."""
    if w.q_proj is not None:
        q = linear(x, w.q_proj)
    else:
        q = linear(rms_norm(linear(x, w.q_a_proj), w.q_a_layernorm, cfg.rms_norm_eps), w.q_b_proj)
    q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
    return q_nope, apply_rope(q_pe, cos, sin, cfg.rope_interleave)


def mla_latents(cfg: ModelConfig, w: MLAWeights, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
    """The new tokens' latents, as the cache keeps them: x [B, T, H] -> (c_kv [B, T, r], k_pe
    [B, T, rope] rotated). Per token: a sequence split may compute them on its share and gather."""
    kv = linear(x, w.kv_a_proj_with_mqa)
    c_kv = rms_norm(kv[..., : cfg.kv_lora_rank], w.kv_a_layernorm, cfg.rms_norm_eps)
    k_pe = apply_rope(kv[..., cfg.kv_lora_rank :], cos, sin, cfg.rope_interleave)
    return c_kv, k_pe


def _write_latents(cfg, w, x, cache, layer, positions, cos, sin) -> KVCache:
    return write_layer(cache, layer, positions, *mla_latents(cfg, w, x, cos, sin))


def _softmax(cfg: ModelConfig, scores: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal softmax over cache slots: key slot s is visible to a query at position p iff s <= p.

    scores [B, T, h, S] (already scaled); positions [B, T].
    """
    s = scores.shape[-1]
    visible = jnp.arange(s)[None, None, None, :] <= positions[:, :, None, None]
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def key_block_for(n_queries: int, n_keys: int, block: int | None) -> int | None:
    """The key block size a step of n_queries per row over n_keys attends in (None: in one
    piece); block None: `step_shapes.attention_key_block` of JAX's default backend. MLA's and
    GQA's (`layers.gqa`) rule."""
    block = attention_key_block(jax.default_backend()) if block is None else int(block)
    if block < 1:
        raise ValueError(f"attention key block must be >= 1, got {block}")
    return block if n_queries > 1 and n_keys > block else None


def key_blocked_attention(block_fn, positions: jax.Array, n_keys: int, block: int, acc_shape, dtype) -> jax.Array:
    """Causal attention over `n_keys` cache slots, `block` keys at a time (online softmax).

    block_fn(start, size) -> (scores [B, T, h, size] scaled, values [B, size, (h,) d],
    contract): the block's scores and values for key slots [start, start + size) (`start`
    may be traced, `size` is static) and `contract(p, values)` -> [B, T, h, d].
    positions [B, T]: key slot s is visible to a query at position p iff s <= p.
    Returns the normalized output [B, T, h, d] (acc_shape) in `dtype`; the running max, sum
    and output are float32, probabilities are cast to the values' dtype for the product as
    the unblocked softmax does. The last block holds n_keys % block slots: no padding copy.
    """
    lead = tuple(acc_shape[:3])
    carry = (jnp.full(lead, -jnp.inf, jnp.float32), jnp.zeros(lead, jnp.float32), jnp.zeros(acc_shape, jnp.float32))

    def update(carry, start, size):
        m, denom, acc = carry
        scores, values, contract = block_fn(start, size)
        visible = (start + jnp.arange(size))[None, None, None, :] <= positions[:, :, None, None]
        scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
        m_new = jnp.maximum(m, scores.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no key visible yet: nothing to rescale
        p = jnp.exp(scores - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = alpha * denom + p.sum(-1)
        acc = alpha[..., None] * acc + contract(p.astype(values.dtype), values).astype(jnp.float32)
        return m_new, denom, acc

    n_full = n_keys // block
    if n_full:
        # blocks past the furthest slot a real query (position < n_keys) sees add p = 0, alpha = 1: skipped
        last = jnp.max(jnp.where(positions < n_keys, positions, -1))
        n_used = jnp.clip(last // block + 1, 0, n_full)
        carry = jax.lax.fori_loop(0, n_used, lambda i, c: update(c, i * block, block), carry)
    if n_keys % block:
        carry = update(carry, n_full * block, n_keys % block)
    _, denom, acc = carry
    return (acc / jnp.where(denom > 0, denom, 1.0)[..., None]).astype(dtype)


def _key_slice(a: jax.Array, start, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)


def _cached(cache: KVCache, layer, kv_len: int | None, dtype):
    """The layer's latents over the first `kv_len` slots (all when None): [B, S, r], [B, S, rope]."""
    c_kv, k_pe = read_layer(cache, layer, kv_len)
    return c_kv.astype(dtype), k_pe.astype(dtype)


def mla_expanded(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None,
                block: int | None = None):
    """Attention with expanded keys/values. Returns (out [B, T, H], cache with the new latents).

    `kv_len` (static): attend over the first kv_len cache slots only (every visible position
    must be below it); None = the whole cache. `block` (static): key slots per block of the
    blocked attention (None: `step_shapes.attention_key_block`); keys and values are then expanded one
    block at a time, so neither scores nor expanded K/V are ever whole-cache sized.
    """
    cache = _write_latents(cfg, w, x, cache, layer, positions, cos, sin)
    return attend_expanded(cfg, w, x, cache, layer, positions, cos, sin, kv_len, block), cache


def attend_expanded(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None,
                    block: int | None = None):
    """`mla_expanded` without writing: x's queries attend over the cache as it is (which must
    already hold x's own latents, e.g. written with `mla_latents` + `write_layer`).
    -> out [B, T, H]. x and positions may be any subset of the written tokens (a sequence split)."""
    q_nope, q_pe = _queries(cfg, w, x, cos, sin)
    c_kv, k_pe = _cached(cache, layer, kv_len, x.dtype)
    h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim

    def expand(c):
        kv = linear(c, w.kv_b_proj).reshape(*c.shape[:2], h, -1)
        return kv[..., :nope], kv[..., nope:]

    def scores_of(k_nope, kp):
        return (jnp.einsum("bthd,bshd->bths", q_nope, k_nope) + jnp.einsum("bthd,bsd->bths", q_pe, kp)) * cfg.softmax_scale

    blk = key_block_for(x.shape[1], c_kv.shape[1], block)
    if blk is None:
        k_nope, v = expand(c_kv)
        p = _softmax(cfg, scores_of(k_nope, k_pe), positions).astype(x.dtype)
        out = jnp.einsum("bths,bshd->bthd", p, v)
    else:

        def block_fn(start, size):
            k_nope, v = expand(_key_slice(c_kv, start, size))
            return scores_of(k_nope, _key_slice(k_pe, start, size)), v, lambda p, v: jnp.einsum("bths,bshd->bthd", p, v)

        out = key_blocked_attention(block_fn, positions, c_kv.shape[1], blk, (*x.shape[:2], h, cfg.v_head_dim), x.dtype)
    return linear(out.reshape(*x.shape[:2], -1), w.o_proj)


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


def _latent_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, T, h, r] . keys [B, S, r] -> [B, T, h, S], computed keys-major ([B, S, T*h], then
    the small result transposed): XLA on the CPU would otherwise copy-transpose the whole cache
    window for every layer (see docs/PERFORMANCE_MODEL.md, "Measurements behind design choices")."""
    b, t, h, r = q.shape
    s = jax.lax.dot_general(keys, q.reshape(b, t * h, r), (((2,), (2,)), ((0,), (0,))))
    return jnp.swapaxes(s, 1, 2).reshape(b, t, h, keys.shape[1])


def mla_absorbed(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None,
               block: int | None = None):
    """Attention in latent space with kv_b_proj absorbed. Same contract as `mla_expanded`
    (blocked over keys for chunks of several tokens, see the module docstring)."""
    cache = _write_latents(cfg, w, x, cache, layer, positions, cos, sin)
    return attend_absorbed(cfg, w, x, cache, layer, positions, cos, sin, kv_len, block), cache


def attend_absorbed(cfg, w: MLAWeights, x, cache: KVCache, layer: int, positions, cos, sin, kv_len: int | None = None,
                    block: int | None = None):
    """`mla_absorbed` without writing (see `attend_expanded`). -> out [B, T, H]."""
    q_nope, q_pe = _queries(cfg, w, x, cos, sin)
    c_kv, k_pe = _cached(cache, layer, kv_len, x.dtype)
    q_latent = absorb_q(w.kv_b_proj, q_nope, cfg)

    def scores_of(c, kp):
        return (_latent_scores(q_latent, c) + _latent_scores(q_pe, kp)) * cfg.softmax_scale

    blk = key_block_for(x.shape[1], c_kv.shape[1], block)
    if blk is None:
        p = _softmax(cfg, scores_of(c_kv, k_pe), positions).astype(x.dtype)
        o_latent = jnp.einsum("bths,bsr->bthr", p, c_kv)
    else:

        def block_fn(start, size):  # a block's scores as plain dots (XLA's CPU: 1.5x _latent_scores here)
            c, kp = _key_slice(c_kv, start, size), _key_slice(k_pe, start, size)
            scores = (jnp.einsum("bthr,bsr->bths", q_latent, c) + jnp.einsum("bthd,bsd->bths", q_pe, kp)) * cfg.softmax_scale
            return scores, c, lambda p, c: jnp.einsum("bths,bsr->bthr", p, c)

        o_latent = key_blocked_attention(block_fn, positions, c_kv.shape[1], blk,
                                         (*x.shape[:2], cfg.num_attention_heads, cfg.kv_lora_rank), x.dtype)
    out = absorb_out(w.kv_b_proj, o_latent, cfg)
    return linear(out.reshape(*x.shape[:2], -1), w.o_proj)
