"""The CPU kernels' packed layout as a weight format any device can run, and the expert
store's slabs as the stream-loading prefill's source: one host copy of the routed experts.

cpu_ext packs a Linear [n, k] (FP8 or BF16) into tiles of 4 rows whose rows are interleaved in
64-byte segments (cpu_ext/src/pack.c): byte (r, c) of the row-major matrix (c counted in bytes,
k padded to a multiple of 128 elements, n to a multiple of 4) lies at

    (r // 4) * tile_bytes + (c // 64) * 256 + (r % 4) * 64 + c % 64.

An `ExpertStore` packs each FP8/BF16 projection of a layer's experts one after the other into a
slab (`ExpertStore.pack`), so a window of experts is one contiguous run of host memory.
`StoreExperts` hands those runs to `jaxmoe.streaming` as zero-copy numpy views wrapped in
`TiledWeight`; the accelerator receives the bytes as decode reads them and un-tiles them there
(`untile`: a reshape and a transpose, cheap on a GPU) before the model's own grouped matmul.
Nothing is repacked or copied on the host, and the checkpoint's mmap is not needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxmoe import quant
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.handles import HostExperts
from jaxmoe.cpu.host_matrix import live_owners
from jaxmoe.model.weights import ExpertsWeights

TILE_ROWS, SEGMENT, KBLOCK = 4, 64, 128


@struct.dataclass
class TiledWeight:
    """One projection of E experts in the kernels' packed layout (see the module docstring).

    data: uint8 [E, slot_bytes] (each row: one expert's packed tiles, then slab padding);
    scale: float32 [E, ceil(n/128), ceil(k/128)] FP8 block scales, or None for BF16 values.
    """

    data: Any
    scale: Any
    n: int = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data.shape[0], self.n, self.k)


def untile(data: jax.Array, n: int, k: int, elem: int) -> jax.Array:
    """uint8 [E, >= packed bytes] -> uint8 [E, n, k * elem], the row-major bytes."""
    e = data.shape[0]
    k_pad = -(-k // KBLOCK) * KBLOCK
    n_tiles = -(-n // TILE_ROWS)
    row_bytes = k_pad * elem
    d = data[:, : n_tiles * TILE_ROWS * row_bytes].reshape(e, n_tiles, row_bytes // SEGMENT, TILE_ROWS, SEGMENT)
    d = jnp.swapaxes(d, 2, 3).reshape(e, n_tiles * TILE_ROWS, row_bytes)
    return d[:, :n, : k * elem]


@quant.dequantize.register
def _(w: TiledWeight, dtype=jnp.float32) -> jax.Array:
    if w.scale is None:  # BF16: two bytes per value, little-endian
        raw = untile(w.data, w.n, w.k, 2).reshape(w.data.shape[0], w.n, w.k, 2)
        return jax.lax.bitcast_convert_type(raw, jnp.bfloat16).astype(dtype)
    values = jax.lax.bitcast_convert_type(untile(w.data, w.n, w.k, 1), quant.FP8_DTYPE)
    return quant.dequantize(quant.Fp8Weight(values, w.scale), dtype)


class StoreExperts:
    """Expert source over an `ExpertStore` whose MoE layers lie in slabs: layer ->
    `ExpertsWeights` of `TiledWeight` over zero-copy views of the store's memory."""

    def __init__(self, store: ExpertStore):
        self.store = store

    def __call__(self, layer: int) -> ExpertsWeights:
        if self.store._ptr is None:
            raise ValueError("the expert store this stream-loading source reads was freed (model closed?)")
        _, hidden, inter = self.store._layer_shape(layer)
        projections = []
        for which in range(3):
            slab = self.store.slab(layer, which)
            if slab is None:
                raise ValueError(f"layer {layer} of the expert store is not packed in slabs (INT4 or set_expert); "
                                 "stream it from the checkpoint instead (CheckpointExperts)")
            data, scale, _ = slab
            n, k = (inter, hidden) if which < 2 else (hidden, inter)
            projections.append(TiledWeight(data, scale, n=n, k=k))
        return ExpertsWeights(*projections)

    @classmethod
    def of(cls, experts: tuple[Any, ...]) -> StoreExperts | None:
        """The source for per-layer routed experts held by one live store, every MoE layer in
        slabs; None otherwise (other formats, several stores, INT4 layers)."""
        handles = [e for e in experts if e is not None]
        if not handles or not all(isinstance(e, HostExperts) for e in handles):
            return None
        stores = {e.store for e in handles}
        store = live_owners.get(stores.pop()) if len(stores) == 1 else None
        if not isinstance(store, ExpertStore) or store._ptr is None:
            return None
        if any(store.slab(e.layer, j) is None for e in handles for j in range(3)):
            return None
        return cls(store)

