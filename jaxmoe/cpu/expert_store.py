"""Host-resident weights for the CPU kernels: repacked matrices and the expert store.

Lifetime is explicit: `HostMatrix.create_*` / `ExpertStore(...)` allocate native memory,
`.free()` releases it (also `with ExpertStore(...) as s:`). Until freed, the owner objects are
kept alive by a module registry, so dropping the Python reference never invalidates a handle
that a jitted program still holds. A freed handle passed to a kernel is an error (the library
validates every handle against its registry of live objects), never a crash.

The pytree types that name these objects inside a Weights pytree live in `handles.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import sys
import threading

import ml_dtypes
import numpy as np

from jaxmoe.cpu._lib import DT_BF16, DT_F32, CpuExtError, load
from jaxmoe.cpu.handles import HostExperts, HostGroupedLinear, HostLinear

FMT_FP8, FMT_BF16 = 1, 2
# the weights cache (weights_cache.py) records or supplies the host matrices a placement makes
_from_weight_hook: contextvars.ContextVar = contextvars.ContextVar("jaxmoe_from_weight_hook", default=None)
FMT_INT4 = 3  # group-quantized INT4 (jaxmoe.quant_int4)
_live: dict[int, object] = {}
_live_lock = threading.Lock()


def _as_codes(q) -> np.ndarray:
    """e4m3 values (ml_dtypes / jax) or raw uint8 codes -> a C-contiguous-rows uint8 view."""
    a = np.asarray(q)
    if a.dtype != np.uint8:
        if a.dtype != ml_dtypes.float8_e4m3fn:
            raise TypeError(f"FP8 weights must be float8_e4m3fn or uint8 codes, got {a.dtype}")
        a = a.view(np.uint8)
    if a.ndim != 2:
        raise ValueError(f"a weight matrix must be 2-D, got shape {a.shape}")
    return a if a.strides[1] == 1 else np.ascontiguousarray(a)


def _as_bf16_bits(w) -> np.ndarray:
    a = np.asarray(w)
    if a.dtype == ml_dtypes.bfloat16:  # a view of the bits: no copy (the native packing copies once)
        a = a.view(np.uint16)
    elif a.dtype != np.uint16:
        a = a.astype(ml_dtypes.bfloat16).view(np.uint16)
    if a.ndim != 2:
        raise ValueError(f"a weight matrix must be 2-D, got shape {a.shape}")
    return a if a.strides[1] == 2 else np.ascontiguousarray(a)


class HostMatrix:
    """Owner of one repacked Linear weight [n, k] in host memory."""

    def __init__(self, ptr, n: int, k: int, fmt: int, native=None):
        self._ptr, self.n, self.k, self.format = ptr, n, k, fmt
        self._nat = nat = native or load()
        self.handle = int(nat.ffi.cast("intptr_t", ptr))
        with _live_lock:
            _live[self.handle] = self

    @classmethod
    def fp8(cls, q, scale, node: int = -1, native=None) -> HostMatrix:
        """From e4m3 values [n, k] and fp32 block scales [ceil(n/128), ceil(k/128)].
        `native`: a library variant other than the default (tests)."""
        nat = native or load()
        q = _as_codes(q)
        s = np.ascontiguousarray(np.asarray(scale, np.float32))
        n, k = q.shape
        if s.shape != (-(-n // 128), -(-k // 128)):
            raise ValueError(f"scale shape {s.shape} does not match weight [{n}, {k}] with 128x128 blocks")
        ptr = nat.lib.jm_matrix_create_fp8(
            nat.ffi.cast("uint8_t *", q.ctypes.data), q.strides[0], nat.ffi.cast("float *", s.ctypes.data), s.shape[1],
            n, k, node)
        if ptr == nat.ffi.NULL:
            raise CpuExtError(nat.error())
        return cls(ptr, n, k, FMT_FP8, nat)

    @classmethod
    def bf16(cls, w, node: int = -1, native=None) -> HostMatrix:
        nat = native or load()
        a = _as_bf16_bits(w)
        n, k = a.shape
        ptr = nat.lib.jm_matrix_create_bf16(nat.ffi.cast("uint16_t *", a.ctypes.data), a.strides[0] // 2, n, k, node)
        if ptr == nat.ffi.NULL:
            raise CpuExtError(nat.error())
        return cls(ptr, n, k, FMT_BF16, nat)

    @classmethod
    def int4(cls, qweight, scales, k: int, group: int = 32, node: int = -1, native=None) -> HostMatrix:
        """From INT4 storage (jaxmoe.quant_int4): packed nibbles uint8 [n, >= ceil(k/2)] and
        float16 group scales [n, ceil(k/group)]."""
        nat = native or load()
        q = np.asarray(qweight)
        s = np.asarray(scales)
        if q.dtype != np.uint8 or q.ndim != 2:
            raise TypeError(f"INT4 qweight must be a 2-D uint8 array, got {q.dtype} {q.shape}")
        if s.dtype != np.float16 or s.ndim != 2 or s.shape[0] != q.shape[0] or s.shape[1] != -(-k // group):
            raise ValueError(f"INT4 scales must be float16 [{q.shape[0]}, {-(-k // group)}] for k={k}, group={group}; "
                             f"got {s.dtype} {s.shape}")
        q = q if q.strides[1] == 1 else np.ascontiguousarray(q)
        s = np.ascontiguousarray(s).view(np.uint16)
        n = q.shape[0]
        ptr = nat.lib.jm_matrix_create_int4(nat.ffi.cast("uint8_t *", q.ctypes.data), q.strides[0],
                                            nat.ffi.cast("uint16_t *", s.ctypes.data), s.shape[1], n, k, group, node)
        if ptr == nat.ffi.NULL:
            raise CpuExtError(nat.error())
        return cls(ptr, n, k, FMT_INT4, nat)

    @classmethod
    def from_weight(cls, w, node: int = -1, native=None) -> HostMatrix:
        """From a jaxmoe.quant weight (Fp8Weight, DenseWeight, Int4Weight) of shape [n, k].
        Under `from_weight_hook(hook)`, FP8 / BF16 weights go to hook(w, node, native, make)."""
        hook = _from_weight_hook.get()
        if hook is not None and type(w).__name__ != "Int4Weight":
            return hook(w, node, native, lambda w, node, native: cls._from_weight(w, node, native))
        return cls._from_weight(w, node, native)

    @classmethod
    def _from_weight(cls, w, node: int = -1, native=None) -> HostMatrix:
        if type(w).__name__ == "Int4Weight":  # jaxmoe.quant_int4
            return cls.int4(np.asarray(w.qweight), np.asarray(w.scales), w.k, w.group, node, native)
        q, scale = _pack_args(w)
        return cls.bf16(q, node, native) if scale is None else cls.fp8(q, scale, node, native)

    @property
    def nbytes(self) -> int:
        nat = self._nat
        out = nat.ffi.new("int64_t *")
        nat.check(nat.lib.jm_matrix_info(self._ptr, nat.ffi.NULL, nat.ffi.NULL, nat.ffi.NULL, out))
        return int(out[0])

    def linear(self, x: np.ndarray, out_dtype=np.float32) -> np.ndarray:
        """Direct numpy call (no XLA): x [..., k] f32/bf16 -> [..., n]."""
        nat = self._nat
        x = np.ascontiguousarray(x)
        xdt = _dtype_code(x.dtype)
        y = np.empty(x.shape[:-1] + (self.n,), out_dtype)
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, matrix expects {self.k}")
        nat.check(nat.lib.jm_linear(self._ptr, nat.ffi.cast("void *", x.ctypes.data), xdt, x.size // self.k,
                                    nat.ffi.cast("void *", y.ctypes.data), _dtype_code(y.dtype)))
        return y

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_matrix_free(self._ptr)
            with _live_lock:
                _live.pop(self.handle, None)
            self._ptr = None

    def release(self):
        """Hands the native matrix to a new owner (the store); this object becomes empty."""
        ptr, self._ptr = self._ptr, None
        with _live_lock:
            _live.pop(self.handle, None)
        return ptr

    def pytree(self) -> HostLinear:
        return HostLinear(handle=self.handle, n=self.n, k=self.k)


class HostGroup:
    """Owner of g repacked matrices of one shape [n, k] (e.g. one per attention head), run as
    one call: y[..., j, :] = W_j @ x[..., j, :]."""

    def __init__(self, mats: list[HostMatrix]):
        nat = mats[0]._nat
        ptrs = nat.ffi.new("jm_matrix *[]", [m.release() for m in mats])
        self._nat, self.g, self.n, self.k = nat, len(mats), mats[0].n, mats[0].k
        self._ptr = nat.lib.jm_group_create(ptrs, self.g)
        if self._ptr == nat.ffi.NULL:
            raise CpuExtError(nat.error())
        self.handle = int(nat.ffi.cast("intptr_t", self._ptr))
        with _live_lock:
            _live[self.handle] = self

    @classmethod
    def fp8(cls, q, scale, node: int = -1, native=None) -> HostGroup:
        """From e4m3 values [g, n, k] and fp32 block scales [g, ceil(n/128), ceil(k/128)]."""
        return cls([HostMatrix.fp8(q[j], scale[j], node, native) for j in range(len(q))])

    def linear(self, x: np.ndarray, out_dtype=np.float32) -> np.ndarray:
        """Direct numpy call (no XLA): x [..., g, k] f32/bf16 -> [..., g, n]."""
        nat = self._nat
        x = np.ascontiguousarray(x)
        if x.shape[-2:] != (self.g, self.k):
            raise ValueError(f"x must be [..., {self.g}, {self.k}], got {x.shape}")
        y = np.empty(x.shape[:-1] + (self.n,), out_dtype)
        nat.check(nat.lib.jm_linear_grouped(self._ptr, nat.ffi.cast("void *", x.ctypes.data), _dtype_code(x.dtype),
                                            x.size // (self.g * self.k), nat.ffi.cast("void *", y.ctypes.data),
                                            _dtype_code(y.dtype)))
        return y

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_group_free(self._ptr)
            with _live_lock:
                _live.pop(self.handle, None)
            self._ptr = None

    def pytree(self) -> HostGroupedLinear:
        return HostGroupedLinear(handle=self.handle, g=self.g, n=self.n, k=self.k)


def _dtype_code(dt) -> int:
    dt = np.dtype(dt)
    if dt == np.float32:
        return DT_F32
    if dt == ml_dtypes.bfloat16:
        return DT_BF16
    raise TypeError(f"cpu kernels take float32 or bfloat16, got {dt}")


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
        with _live_lock:
            _live[self.handle] = self

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
            a, fmt, sp, lds = _as_bf16_bits(w), FMT_BF16, nat.ffi.NULL, 0
            ldw = a.strides[0] // 2
        else:
            a, fmt = _as_codes(w), FMT_FP8
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
                self.pack(layer, e, j, *_pack_args(w), node=node_of(e))
        return self.layer(layer)

    @classmethod
    def from_checkpoint(cls, checkpoint, layers=None, node_of=lambda layer, e: -1, native=None,
                        progress=None) -> ExpertStore:
        """All (or `layers`) MoE layers' routed experts, repacked straight from the checkpoint's
        memory-mapped tensors (jaxmoe.loading: a path or an open Checkpoint): the FP8 bytes are
        read once, into the kernels' layout, with no intermediate copy. Pair it with
        `load_checkpoint(..., load_experts=False)` and `to_cpu_placement(weights, store=...)`.

        The packing of each tensor runs on the native thread pool (tiles in parallel; the same
        bytes as a one-thread packing). Reading overlaps it: while expert e is packed, the
        kernel reads ahead the pages of the next READAHEAD_EXPERTS experts (madvise WILLNEED
        on their mapped ranges). Nothing is copied out of the mapping, so the peak memory
        beyond the store itself is that window of page cache, READAHEAD_EXPERTS experts'
        tensors (4 x 44 MB FP8 for DeepSeek-V3 and bench-v3-mid), and no anonymous memory.
        progress: an object with update(tensors, nbytes) (jaxmoe.loading.progress.Progress),
        told after every expert."""
        from jaxmoe.loading.loader import Checkpoint, open_checkpoint  # noqa: PLC0415

        ck = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
        store = None
        try:
            cfg = ck.cfg
            store = cls(cfg.num_hidden_layers, native)
            inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
            jobs = []  # (layer, expert, {name: view of that expert's tensor})
            for li in layers if layers is not None else range(cfg.num_hidden_layers):
                if not cfg.is_moe_layer(li):
                    continue
                arrays = ck.expert_arrays(li)
                n_experts = len(arrays["gate_proj"])
                store.init_layer(li, n_experts, hidden, inter)
                jobs += [(li, e, {key: views[e] for key, views in arrays.items()}) for e in range(n_experts)]
                del arrays
            for job in jobs[:READAHEAD_EXPERTS]:
                _will_need(job[2].values())
            for i, (li, e, ws) in enumerate(jobs):
                if i + READAHEAD_EXPERTS < len(jobs):
                    _will_need(jobs[i + READAHEAD_EXPERTS][2].values())
                node = node_of(li, e)
                if "gate_proj_scales" in ws:  # INT4 (a converted checkpoint): matrices of their own
                    store.set_expert(li, e, *[
                        HostMatrix.int4(ws[p], ws[f"{p}_scales"], inter if p == "down_proj" else hidden,
                                        ck.int4_group, node, store._nat) for p in PROJECTIONS])
                else:
                    for j, p in enumerate(PROJECTIONS):  # FP8 / bf16: straight into the slabs
                        store.pack(li, e, j, ws[p], ws.get(f"{p}_scale_inv"), node)
                jobs[i] = None  # drop the views as we go
                if progress is not None:
                    progress.update(sum(not k.endswith("_scale_inv") for k in ws), sum(int(a.nbytes) for a in ws.values()))
            del jobs
        except BaseException:
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
        nat.check(nat.lib.jm_moe(self._live_ptr(), layer, c("void *", x.ctypes.data), _dtype_code(x.dtype), x.shape[0],
                                 c("int32_t *", ids.ctypes.data), c("float *", w.ctypes.data), ids.shape[1],
                                 c("void *", out.ctypes.data), _dtype_code(out.dtype)))
        return out

    def _live_ptr(self):
        if self._ptr is None:
            raise CpuExtError("expert store already freed")
        return self._ptr

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_store_free(self._ptr)
            with _live_lock:
                _live.pop(self.handle, None)
            self._ptr = None


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
READAHEAD_EXPERTS = 4  # experts whose pages ExpertStore.from_checkpoint asks the kernel to read ahead
_MADV_WILLNEED, _PAGE = 3, 4096


def _madvise():
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


_madvise_fn = _madvise() if sys.platform.startswith("linux") else None


def _will_need(views) -> None:
    """Starts the kernel's readahead of the pages under memory-mapped views (advice only:
    nothing is copied, cached pages cost nothing)."""
    if _madvise_fn is None:
        return
    for a in views:
        if a.nbytes:
            addr = a.ctypes.data
            start = addr - addr % _PAGE
            _madvise_fn(start, addr + a.nbytes - start, _MADV_WILLNEED)


def _pack_args(w) -> tuple:
    """(values, scale or None) of an FP8 / dense weight for `ExpertStore.pack`."""
    from jaxmoe import quant  # noqa: PLC0415

    if isinstance(w, quant.Fp8Weight):
        if tuple(w.block) != (128, 128):
            raise ValueError(f"cpu kernels need 128x128 FP8 blocks, got {w.block}")
        return np.asarray(w.weight), np.asarray(w.weight_scale_inv)
    if isinstance(w, quant.DenseWeight):
        return np.asarray(w.weight), None
    raise TypeError(f"cannot place a {type(w).__name__} in host memory")


def _expert_slice(w, e: int):
    from jaxmoe import quant  # noqa: PLC0415

    if isinstance(w, quant.Fp8Weight):
        return quant.Fp8Weight(weight=np.asarray(w.weight)[e], weight_scale_inv=np.asarray(w.weight_scale_inv)[e], block=w.block)
    if isinstance(w, quant.DenseWeight):
        return quant.DenseWeight(weight=np.asarray(w.weight)[e])
    if type(w).__name__ == "Int4Weight":  # jaxmoe.quant_int4
        return dataclasses.replace(w, qweight=np.asarray(w.qweight)[e], scales=np.asarray(w.scales)[e])
    raise TypeError(f"cannot place a {type(w).__name__} in host memory")


@contextlib.contextmanager
def from_weight_hook(hook):
    """HostMatrix.from_weight calls for FP8 / BF16 weights in this context go to `hook`."""
    token = _from_weight_hook.set(hook)
    try:
        yield
    finally:
        _from_weight_hook.reset(token)


def free_all() -> None:
    """Frees every live host matrix and store (end of a process, tests)."""
    with _live_lock:
        owners = list(_live.values())
    for o in owners:
        o.free()
