"""MLA's compressed latent KV cache: per layer, per position only `c_kv` (the kv_a_layernorm'd
latent, kv_lora_rank wide) and `k_pe` (the rotated shared rope key, qk_rope_head_dim wide) --
576 numbers per token per layer for DeepSeek-V3, instead of the 128 heads x (192 + 128) an
expanded cache would hold. Other families use the same two arrays at their own widths
(`widths=`; GQA: keys in `c_kv`, values in `k_pe`, jaxmoe/layers/gqa.py).

Two layouts behind the same `write_layer` / `read_layer`:
- contiguous: [L, slots, max_len, .], a sequence per slot (tests, a streamed prompt's own cache);
- paged (`block_table` set): a pool [L, n_blocks, block_size, .] of fixed-size blocks, each
  step row reading and writing through its row of the block table [B, blocks per sequence]
  (position p lives in block table[b, p // block_size] at offset p % block_size), so sequences
  hold only the blocks they fill and may share full ones (serving/kv_blocks.py decides which).
  Reads gather the step's key window block by block inside the jitted program: no host work
  per token.
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

    c_kv: jax.Array  # [L, slots, S, kv_lora_rank] (paged: [L, n_blocks, block_size, kv_lora_rank])
    k_pe: jax.Array  # [L, slots, S, qk_rope_head_dim] (paged: [L, n_blocks, block_size, qk_rope_head_dim])
    rows: jax.Array | None = None
    block_table: jax.Array | None = None  # paged: [B, blocks per sequence] int32, the step rows' blocks
    seq_len: int | None = struct.field(pytree_node=False, default=None)  # paged: positions per sequence

    @property
    def paged(self) -> bool:
        return self.seq_len is not None

    @property
    def max_len(self) -> int:
        return int(self.seq_len if self.paged else self.c_kv.shape[2])

    @property
    def block_size(self) -> int:
        return int(self.c_kv.shape[2])

    @property
    def batch(self) -> int:
        if self.paged:
            return int(self.block_table.shape[0])
        return int(self.c_kv.shape[1] if self.rows is None else self.rows.shape[0])


def cache_widths(cfg: ModelConfig) -> tuple[int, int]:
    """The numbers per position per layer in `c_kv` and `k_pe`: MLA's (kv_lora_rank, qk_rope_head_dim)."""
    return cfg.kv_lora_rank, cfg.qk_rope_head_dim


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, widths: tuple[int, int] | None = None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions. widths: the two arrays'
    numbers per position (another family's layout, e.g. GQA's keys and values); None: MLA's
    (`cache_widths`). `cfg` needs only num_hidden_layers and max_position_embeddings."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"cache max_len {max_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    L, (c_w, pe_w) = cfg.num_hidden_layers, widths or cache_widths(cfg)
    return KVCache(c_kv=jnp.zeros((L, batch, max_len, c_w), dtype), k_pe=jnp.zeros((L, batch, max_len, pe_w), dtype))


def init_paged_cache(cfg: ModelConfig, n_blocks: int, block_size: int, seq_len: int, dtype=jnp.float32,
                     widths: tuple[int, int] | None = None) -> KVCache:
    """An empty pool of `n_blocks` blocks of `block_size` positions for sequences of up to
    `seq_len` positions; `block_table` is set per step (`cache.replace(block_table=...)`).
    widths: as `init_cache`'s."""
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"cache seq_len {seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    L, (c_w, pe_w) = cfg.num_hidden_layers, widths or cache_widths(cfg)
    return KVCache(c_kv=jnp.zeros((L, n_blocks, block_size, c_w), dtype), k_pe=jnp.zeros((L, n_blocks, block_size, pe_w), dtype),
                   seq_len=int(seq_len))


def paged_slots(cache: KVCache, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(block, offset) [B, T] of `positions` through the block table; positions >= max_len get
    block n_blocks (out of range: a write there is dropped)."""
    bs, table = cache.block_size, cache.block_table
    idx = jnp.clip(positions // bs, 0, table.shape[1] - 1)
    block = jnp.take_along_axis(table, idx, axis=1)
    block = jnp.where((positions >= 0) & (positions < cache.max_len), block, cache.c_kv.shape[1])
    return block, positions % bs


def write_layer(cache: KVCache, layer: int, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array) -> KVCache:
    """Store the latents of new tokens [B, T, .] at `positions` [B, T] of one layer.

    Positions >= max_len are dropped: that is how padded tokens are kept out of the cache
    (give them position `max_len`; negative positions would wrap like numpy indices).
    """
    if cache.paged:
        block, offset = paged_slots(cache, positions)
        return cache.replace(
            c_kv=cache.c_kv.at[layer, block, offset].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
            k_pe=cache.k_pe.at[layer, block, offset].set(k_pe.astype(cache.k_pe.dtype), mode="drop"),
        )
    b = (jnp.arange(positions.shape[0]) if cache.rows is None else cache.rows)[:, None]
    return cache.replace(
        c_kv=cache.c_kv.at[layer, b, positions].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
        k_pe=cache.k_pe.at[layer, b, positions].set(k_pe.astype(cache.k_pe.dtype), mode="drop"),
    )


def read_layer(cache: KVCache, layer, kv_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's latents of the step's rows over the first `kv_len` positions (all when
    None): c_kv [B, S, kv_lora_rank], k_pe [B, S, qk_rope_head_dim]."""
    if cache.paged:
        table = cache.block_table
        return _gather_blocks(cache.c_kv[layer], table, kv_len), _gather_blocks(cache.k_pe[layer], table, kv_len)
    c_kv, k_pe = cache.c_kv[layer], cache.k_pe[layer]
    if kv_len is not None:
        c_kv, k_pe = c_kv[:, :kv_len], k_pe[:, :kv_len]
    if cache.rows is not None:
        c_kv, k_pe = c_kv[cache.rows], k_pe[cache.rows]
    return c_kv, k_pe


def _gather_blocks(pool: jax.Array, table: jax.Array, kv_len: int | None) -> jax.Array:
    """pool [n_blocks, bs, d] through table [B, nb] -> [B, kv_len, d] (positions 0..kv_len-1)."""
    bs = pool.shape[1]
    nb = table.shape[1] if kv_len is None else -(-kv_len // bs)
    out = pool[table[:, :nb]]  # [B, nb, bs, d]
    out = out.reshape(out.shape[0], nb * bs, out.shape[-1])
    return out if kv_len is None else out[:, :kv_len]
