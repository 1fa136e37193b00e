"""MLA's compressed latent KV cache: per layer, per sequence slot, per position only
`c_kv` (the kv_a_layernorm'd latent, kv_lora_rank wide) and `k_pe` (the rotated shared rope
key, qk_rope_head_dim wide) -- 576 numbers per token per layer for DeepSeek-V3, instead of
the 128 heads x (192 + 128) an expanded cache would hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxmoe.config import ModelConfig


@struct.dataclass
class KVCache:
    """`rows` (optional, [B] int32): the cache slot each batch row of a step reads and writes,
    so a step may run over fewer rows than the cache has slots (the serving engine runs only
    its active slots); None: batch row b is slot b."""

    c_kv: jax.Array  # [L, slots, S, kv_lora_rank]
    k_pe: jax.Array  # [L, slots, S, qk_rope_head_dim]
    rows: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return int(self.c_kv.shape[2])

    @property
    def batch(self) -> int:
        return int(self.c_kv.shape[1] if self.rows is None else self.rows.shape[0])


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"cache max_len {max_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    L = cfg.num_hidden_layers
    return KVCache(
        c_kv=jnp.zeros((L, batch, max_len, cfg.kv_lora_rank), dtype),
        k_pe=jnp.zeros((L, batch, max_len, cfg.qk_rope_head_dim), dtype),
    )


def write_layer(cache: KVCache, layer: int, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array) -> KVCache:
    """Store the latents of new tokens [B, T, .] at `positions` [B, T] of one layer.

    Positions >= max_len are dropped: that is how padded tokens are kept out of the cache
    (give them position `max_len`; negative positions would wrap like numpy indices).
    """
    b = (jnp.arange(positions.shape[0]) if cache.rows is None else cache.rows)[:, None]
    return cache.replace(
        c_kv=cache.c_kv.at[layer, b, positions].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
        k_pe=cache.k_pe.at[layer, b, positions].set(k_pe.astype(cache.k_pe.dtype), mode="drop"),
    )


def read_layer(cache: KVCache, layer, kv_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's latents of the step's rows over the first `kv_len` positions (all when
    None): c_kv [B, S, kv_lora_rank], k_pe [B, S, qk_rope_head_dim]."""
    c_kv, k_pe = cache.c_kv[layer], cache.k_pe[layer]
    if kv_len is not None:
        c_kv, k_pe = c_kv[:, :kv_len], k_pe[:, :kv_len]
    if cache.rows is not None:
        c_kv, k_pe = c_kv[cache.rows], k_pe[cache.rows]
    return c_kv, k_pe
