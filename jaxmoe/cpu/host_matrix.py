"""Host-resident matrices for the CPU kernels, and the registry of every live native owner.

Owns `HostMatrix` (one repacked Linear weight [n, k]: FP8, BF16 or INT4) and `HostGroup` (g
matrices of one shape run as one call), the conversions of weights into the kernels' inputs
(`as_fp8_codes`, `as_bf16_bits`, `pack_args`, `dtype_code`), the `from_weight_hook` context
through which the weights cache supplies or records host matrices, and `live_owners`: the
registry of live native owners (matrices, groups and the expert stores of `expert_store.py`).

Lifetime is explicit: `HostMatrix.fp8` / `.bf16` / `.int4` and `ExpertStore(...)` allocate native memory,
`.free()` releases it; `free_all()` frees every live owner. Until freed, the owner objects are
kept alive by the registry, so dropping the Python reference never invalidates a handle that a
jitted program still holds. A freed handle passed to a kernel is an error (the library
validates every handle against its registry of live objects), never a crash.

The pytree types that name these objects inside a Weights pytree live in `handles.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import ml_dtypes
import numpy as np

from jaxmoe.cpu._lib import DT_BF16, DT_F32, CpuExtError, load
from jaxmoe.cpu.handles import HostGroupedLinear, HostLinear

FMT_FP8, FMT_BF16 = 1, 2
FMT_INT4 = 3  # group-quantized INT4 (jaxmoe.quant_int4)
# the weights cache (weights_cache.py) records or supplies the host matrices a placement makes
_from_weight_hook: contextvars.ContextVar = contextvars.ContextVar("jaxmoe_from_weight_hook", default=None)
live_owners: dict[int, object] = {}  # handle -> its live owner (HostMatrix, HostGroup, ExpertStore)
_live_lock = threading.Lock()


def register_owner(owner) -> None:
    """Keeps `owner` (with its `handle`) alive until `unregister_owner(owner.handle)`."""
    with _live_lock:
        live_owners[owner.handle] = owner


def unregister_owner(handle: int) -> None:
    with _live_lock:
        live_owners.pop(handle, None)


def free_all() -> None:
    """Frees every live host matrix and store (end of a process, tests)."""
    with _live_lock:
        owners = list(live_owners.values())
    for o in owners:
        o.free()


def as_fp8_codes(q) -> np.ndarray:
    """e4m3 values (ml_dtypes / jax) or raw uint8 codes -> a C-contiguous-rows uint8 view."""
    a = np.asarray(q)
    if a.dtype != np.uint8:
        if a.dtype != ml_dtypes.float8_e4m3fn:
            raise TypeError(f"FP8 weights must be float8_e4m3fn or uint8 codes, got {a.dtype}")
        a = a.view(np.uint8)
    if a.ndim != 2:
        raise ValueError(f"a weight matrix must be 2-D, got shape {a.shape}")
    return a if a.strides[1] == 1 else np.ascontiguousarray(a)


def as_bf16_bits(w) -> np.ndarray:
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
        register_owner(self)

    @classmethod
    def fp8(cls, q, scale, node: int = -1, native=None) -> HostMatrix:
        """From e4m3 values [n, k] and fp32 block scales [ceil(n/128), ceil(k/128)].
        `native`: a library variant other than the default (tests)."""
        nat = native or load()
        q = as_fp8_codes(q)
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
        a = as_bf16_bits(w)
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
        q, scale = pack_args(w)
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
        xdt = dtype_code(x.dtype)
        y = np.empty(x.shape[:-1] + (self.n,), out_dtype)
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, matrix expects {self.k}")
        nat.check(nat.lib.jm_linear(self._ptr, nat.ffi.cast("void *", x.ctypes.data), xdt, x.size // self.k,
                                    nat.ffi.cast("void *", y.ctypes.data), dtype_code(y.dtype)))
        return y

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_matrix_free(self._ptr)
            unregister_owner(self.handle)
            self._ptr = None

    def release(self):
        """Hands the native matrix to a new owner (the store); this object becomes empty."""
        ptr, self._ptr = self._ptr, None
        unregister_owner(self.handle)
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
        register_owner(self)

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
        nat.check(nat.lib.jm_linear_grouped(self._ptr, nat.ffi.cast("void *", x.ctypes.data), dtype_code(x.dtype),
                                            x.size // (self.g * self.k), nat.ffi.cast("void *", y.ctypes.data),
                                            dtype_code(y.dtype)))
        return y

    def free(self) -> None:
        if self._ptr is not None:
            self._nat.lib.jm_group_free(self._ptr)
            unregister_owner(self.handle)
            self._ptr = None

    def pytree(self) -> HostGroupedLinear:
        return HostGroupedLinear(handle=self.handle, g=self.g, n=self.n, k=self.k)


def dtype_code(dt) -> int:
    dt = np.dtype(dt)
    if dt == np.float32:
        return DT_F32
    if dt == ml_dtypes.bfloat16:
        return DT_BF16
    raise TypeError(f"cpu kernels take float32 or bfloat16, got {dt}")


def pack_args(w) -> tuple:
    """(values, scale or None) of an FP8 / dense weight for `HostMatrix` and `ExpertStore.pack`."""
    from jaxmoe import quant  # noqa: PLC0415

    if isinstance(w, quant.Fp8Weight):
        if tuple(w.block) != (128, 128):
            raise ValueError(f"cpu kernels need 128x128 FP8 blocks, got {w.block}")
        return np.asarray(w.weight), np.asarray(w.weight_scale_inv)
    if isinstance(w, quant.DenseWeight):
        return np.asarray(w.weight), None
    raise TypeError(f"cannot place a {type(w).__name__} in host memory")


@contextlib.contextmanager
def from_weight_hook(hook):
    """HostMatrix.from_weight calls for FP8 / BF16 weights in this context go to `hook`."""
    token = _from_weight_hook.set(hook)
    try:
        yield
    finally:
        _from_weight_hook.reset(token)
