"""The expert store: the routed experts of every MoE layer, repacked in host memory.

Owns `ExpertStore` (per-layer-projection slabs of FP8 / BF16 experts, INT4 experts as matrices
of their own; `handle` is what the XLA call takes), its packing from stacked weights
(`add_layer`) or straight from a checkpoint's memory-mapped tensors (`from_checkpoint`, read
ahead on a thread: `loading.readahead`), and the fused MoE call. The host matrices it is filled from, and the
registry that keeps every live native owner (stores included) alive until `.free()`, are in
`host_matrix.py`; the pytree naming a store's layer (`HostExperts`) is in `handles.py`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from jaxmoe.cpu._lib import CpuExtError, load
from jaxmoe.cpu.handles import HostExperts
from jaxmoe.cpu.host_matrix import (
    FMT_BF16,
    FMT_FP8,
    HostMatrix,
    as_bf16_bits,
    as_fp8_codes,
    dtype_code,
    pack_args,
    register_owner,
    unregister_owner,
)
from jaxmoe.loading.readahead import ReadAhead, readahead_unit


class ExpertStore:
    """The routed experts of every MoE layer, repacked in host memory; `handle` is what the XLA
    call takes."""

    def __init__(self, n_layers: int, native=None):
        self._nat = nat = native or load()
        self._ptr = nat.lib.jm_store_create(n_layers)
        if self._ptr == nat.ffi.NULL:
            raise CpuExtError(nat.error())
        self.n_layers = n_layers
        self.handle = int(nat.ffi.cast("intptr_t", self._ptr))
        register_owner(self)

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def init_layer(self, layer: int, n_experts: int, hidden: int, inter: int) -> None:
        nat = self._nat
        nat.check(nat.lib.jm_store_init_layer(self._live_ptr(), layer, n_experts, hidden, inter))

    def set_expert(self, layer: int, expert: int, gate: HostMatrix, up: HostMatrix, down: HostMatrix) -> None:
        """Moves three HostMatrix objects into the store (they are emptied, even on error)."""
        nat = self._nat
        nat.check(nat.lib.jm_store_set_expert(self._live_ptr(), layer, expert, gate.release(), up.release(), down.release()))

    def pack(self, layer: int, expert: int, which: int, w, scale=None, node: int = -1) -> None:
        """Packs projection `which` (0 gate, 1 up, 2 down) of one expert into the layer's slab:
        FP8 e4m3 values (or uint8 codes) [n, k] with fp32 block scales, or bf16 [n, k] (scale
        None). The experts of a slab lie one after the other (`slab`)."""
        nat, c = self._nat, self._nat.ffi.cast
        if scale is None:
            a, fmt, sp, lds = as_bf16_bits(w), FMT_BF16, nat.ffi.NULL, 0
            ldw = a.strides[0] // 2
        else:
            a, fmt = as_fp8_codes(w), FMT_FP8
            sc = np.ascontiguousarray(np.asarray(scale, np.float32))
            sp, lds, ldw = c("float *", sc.ctypes.data), sc.shape[1], a.strides[0]
        nat.check(nat.lib.jm_store_pack(self._live_ptr(), layer, expert, which, fmt, c("void *", a.ctypes.data), ldw,
                                        sp, lds, node))

    def slab(self, layer: int, which: int) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """Zero-copy views of one projection's slab: (uint8 [E, slot_bytes] packed tiles,
        float32 [E, ceil(n/128), ceil(k/128)] block scales or None (BF16), packed bytes per
        expert); None when some expert of the layer is not in the slab. The views borrow the
        store's memory: valid until it is freed."""
        nat = self._nat
        ptrs = [nat.ffi.new("const uint8_t **"), nat.ffi.new("int64_t *"), nat.ffi.new("int64_t *"),
                nat.ffi.new("const float **"), nat.ffi.new("int64_t *"), nat.ffi.new("int32_t *")]
        if nat.lib.jm_store_slab(self._live_ptr(), layer, which, *ptrs) != 0:
            return None
        n_experts, hidden, inter = self._layer_shape(layer)
        n, k = (inter, hidden) if which < 2 else (hidden, inter)
        slot, packed, floats = int(ptrs[1][0]), int(ptrs[2][0]), int(ptrs[4][0])
        data = np.frombuffer(nat.ffi.buffer(ptrs[0][0], n_experts * slot), np.uint8).reshape(n_experts, slot)
        if int(ptrs[5][0]) != FMT_FP8:
            return data, None, packed
        scale = np.frombuffer(nat.ffi.buffer(ptrs[3][0], 4 * n_experts * floats), np.float32)
        return data, scale.reshape(n_experts, -(-n // 128), -(-k // 128)), packed

    def add_layer(self, layer: int, gate, up, down, node_of=lambda e: -1) -> HostExperts:
        """Packs one layer from stacked weights: jaxmoe.quant Fp8Weight / DenseWeight with a
        leading expert axis (gate/up [E, I, H], down [E, H, I]), e.g. ExpertsWeights fields.
        FP8 and bf16 go into the layer's slabs (`pack`), INT4 into matrices of their own."""
        n_experts, inter, hidden = gate.shape
        self.init_layer(layer, n_experts, hidden, inter)
        for e in range(n_experts):
            ws = [_expert_slice(w, e) for w in (gate, up, down)]
            if any(type(w).__name__ == "Int4Weight" for w in ws):
                self.set_expert(layer, e, *[HostMatrix.from_weight(w, node_of(e), self._nat) for w in ws])
                continue
            for j, w in enumerate(ws):
                self.pack(layer, e, j, *pack_args(w), node=node_of(e))
        return self.layer(layer)

    @staticmethod
    def _checkpoint_jobs(ck, layers=None) -> list[tuple[int, int, dict[str, np.ndarray]]]:
        """(layer, expert, {name: view of that expert's tensor}) of every routed expert that
        `from_checkpoint` packs from an open Checkpoint, in its order (the files' order)."""
        jobs = []
        for li in layers if layers is not None else range(ck.cfg.num_hidden_layers):
            if ck.cfg.is_moe_layer(li):
                arrays = ck.expert_arrays(li)
                jobs += [(li, e, {key: views[e] for key, views in arrays.items()}) for e in range(len(arrays["gate_proj"]))]
        return jobs

    @classmethod
    def from_checkpoint(cls, checkpoint, layers=None, node_of=lambda layer, e: -1, native=None,
                        progress=None, read_after=()) -> ExpertStore:
        """All (or `layers`) MoE layers' routed experts, repacked straight from the checkpoint's
        memory-mapped tensors (jaxmoe.loading: a path or an open Checkpoint): the FP8 bytes are
        read once, into the kernels' layout, with no intermediate copy. Pair it with
        `load_checkpoint(..., load_experts=False)` and `to_cpu_placement(weights, store=...)`.

        The packing of each tensor runs on the native thread pool (tiles in parallel; the same
        bytes as a one-thread packing). Reading overlaps it: a `loading.readahead.ReadAhead`
        thread has the kernel read the experts' pages ahead of the packer, at most its window
        (512 MiB) beyond the expert being packed. Nothing is copied out of the mapping, so the
        peak memory beyond the store itself is that window of page cache, and no anonymous
        memory. read_after: views the same thread reads once the experts are packed (the loader's
        other tensors): it goes on by itself after this returns, and ends after the last.
        progress: an object with update(tensors, nbytes) (jaxmoe.loading.progress.Progress),
        told after every expert."""
        from jaxmoe.loading.loader import Checkpoint, open_checkpoint  # noqa: PLC0415

        ck = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
        store = ra = None
        try:
            jobs = cls._checkpoint_jobs(ck, layers)
            ra = ReadAhead([a for job in jobs for a in job[2].values()] + list(read_after), unit=readahead_unit(ck.path))
            cfg = ck.cfg
            store = cls(cfg.num_hidden_layers, native)
            inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
            for li, n_experts in sorted(Counter(job[0] for job in jobs).items()):
                store.init_layer(li, n_experts, hidden, inter)
            for i, (li, e, ws) in enumerate(jobs):
                node = node_of(li, e)
                if "gate_proj_scales" in ws:  # INT4 (a converted checkpoint): matrices of their own
                    store.set_expert(li, e, *[
                        HostMatrix.int4(ws[p], ws[f"{p}_scales"], inter if p == "down_proj" else hidden,
                                        ck.int4_group, node, store._nat) for p in PROJECTIONS])
                else:
                    for j, p in enumerate(PROJECTIONS):  # FP8 / bf16: straight into the slabs
                        store.pack(li, e, j, ws[p], ws.get(f"{p}_scale_inv"), node)
                jobs[i] = None  # drop the views as we go
                nbytes = sum(int(a.nbytes) for a in ws.values())
                ra.consumed(nbytes)
                if progress is not None:
                    progress.update(sum(not k.endswith("_scale_inv") for k in ws), nbytes)
            del jobs
            ra.unbounded()  # on to read_after
        except BaseException:
            if ra is not None:
                ra.close()
            if store is not None:
                store.free()  # nothing half-loaded survives
            raise
        finally:
            if ck is not checkpoint:
                ck.close()
        return store

    def _layer_shape(self, layer: int, complete: bool = False) -> tuple[int, int, int]:
        nat = self._nat
        vals = [nat.ffi.new("int32_t *") for _ in range(4)]
        nat.check(nat.lib.jm_store_layer_info(self._live_ptr(), layer, *vals))
        if complete and not vals[3][0]:
            raise CpuExtError(f"layer {layer} of the expert store is not fully loaded")
        return int(vals[0][0]), int(vals[1][0]), int(vals[2][0])

    def layer(self, layer: int) -> HostExperts:
        n_experts, hidden, inter = self._layer_shape(layer, complete=True)
        return HostExperts(store=self.handle, layer=layer, n_experts=n_experts, hidden=hidden, inter=inter)

    @property
    def nbytes(self) -> int:
        return int(self._nat.lib.jm_store_bytes(self._live_ptr()))

    def moe(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, out_dtype=None) -> np.ndarray:
        """Direct numpy call of the fused MoE layer (no XLA)."""
        nat = self._nat
        x = np.ascontiguousarray(x)
        ids = np.ascontiguousarray(ids, np.int32)
        w = np.ascontiguousarray(weights, np.float32)
        if ids.shape != w.shape or ids.ndim != 2 or x.ndim != 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"x [T, H], ids and weights [T, k] expected; got {x.shape}, {ids.shape}, {w.shape}")
        out = np.empty(x.shape, out_dtype or x.dtype)
        c = nat.ffi.cast
        nat.check(nat.lib.jm_moe(self._live_ptr(), layer, c("void *", x.ctypes.data), dtype_code(x.dtype), x.shape[0],
                                 c("int32_t *", ids.ctypes.data), c("float *", w.ctypes.data), ids.shape[1],
                                 c("void *", out.ctypes.data), dtype_code(out.dtype)))
        return out

    def _live_ptr(self):
        if self._ptr is None:
            raise CpuExtError("expert store already freed")
        return self._ptr

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_store_free(self._ptr)
            unregister_owner(self.handle)
            self._ptr = None


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_slice(w, e: int):
    from jaxmoe import quant  # noqa: PLC0415

    if isinstance(w, quant.Fp8Weight):
        return quant.Fp8Weight(weight=np.asarray(w.weight)[e], weight_scale_inv=np.asarray(w.weight_scale_inv)[e], block=w.block)
    if isinstance(w, quant.DenseWeight):
        return quant.DenseWeight(weight=np.asarray(w.weight)[e])
    if type(w).__name__ == "Int4Weight":  # jaxmoe.quant_int4
        return dataclasses.replace(w, qweight=np.asarray(w.qweight)[e], scales=np.asarray(w.scales)[e])
    raise TypeError(f"cannot place a {type(w).__name__} in host memory")
