"""JAX wrappers of the cpu_ext kernels as XLA custom calls (FFI, CPU platform).

`linear(x, w)` and `moe_experts(x, ids, weights, layer)` work inside `jax.jit`; the weights
stay in host memory and only their handle travels, as an int64 attribute. An error inside a
handler (freed handle, wrong shape, expert id out of range) raises a Python exception with
the library's message. These are CPU-platform targets: on a GPU box call them from a program
placed on `jax.devices("cpu")[0]`.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.cpu._lib import CpuExtError, load
from jaxmoe.cpu.handles import HostExperts, HostGroupedLinear, HostLinear

LINEAR_TARGET = "jaxmoe_cpu_linear"
GROUPED_TARGET = "jaxmoe_cpu_linear_grouped"
MOE_TARGET = "jaxmoe_cpu_moe"
MOE_DYN_TARGET = "jaxmoe_cpu_moe_dyn"
_registered = False
_lock = threading.Lock()


def register() -> None:
    """Registers the FFI targets with XLA (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        nat = load()
        if not hasattr(nat.lib, "jm_ffi_handler"):
            raise CpuExtError("the cpu_ext library was built without the XLA FFI handlers (jax headers missing at build time)")
        for target, name in ((LINEAR_TARGET, b"linear"), (GROUPED_TARGET, b"linear_grouped"), (MOE_TARGET, b"moe"),
                             (MOE_DYN_TARGET, b"moe_dyn")):
            ptr = nat.lib.jm_ffi_handler(name)
            addr = int(nat.ffi.cast("uintptr_t", ptr))
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(addr), platform="cpu")
        _registered = True


def _act(x: jax.Array) -> jax.Array:
    return x if x.dtype in (jnp.float32, jnp.bfloat16) else x.astype(jnp.float32)


def linear(x: jax.Array, w: HostLinear) -> jax.Array:
    """y[..., n] = x[..., k] @ W^T with W in host memory; y has x's dtype (f32 or bf16)."""
    register()
    x_in = _act(jnp.asarray(x))
    if x_in.shape[-1] != w.k:
        raise ValueError(f"linear: x has {x_in.shape[-1]} features, the host weight is [{w.n}, {w.k}]")
    out = jax.ShapeDtypeStruct(x_in.shape[:-1] + (w.n,), x_in.dtype)
    y = jax.ffi.ffi_call(LINEAR_TARGET, out)(x_in, matrix=np.int64(w.handle))
    return y.astype(x.dtype) if y.dtype != x.dtype else y


def grouped_linear(x: jax.Array, w: HostGroupedLinear) -> jax.Array:
    """y[..., j, :] = W_j @ x[..., j, :] for the g matrices of a HostGroup (e.g. per head)."""
    register()
    x_in = _act(jnp.asarray(x))
    if x_in.shape[-2:] != (w.g, w.k):
        raise ValueError(f"grouped_linear: x must be [..., {w.g}, {w.k}], got {x_in.shape}")
    out = jax.ShapeDtypeStruct(x_in.shape[:-1] + (w.n,), x_in.dtype)
    y = jax.ffi.ffi_call(GROUPED_TARGET, out)(x_in, group=np.int64(w.handle))
    return y.astype(x.dtype) if y.dtype != x.dtype else y


def moe_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, layer: HostExperts, layer_index=None) -> jax.Array:
    """Fused routed experts of one layer: out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]).

    x [T, hidden] (f32 or bf16), ids [T, k] (int, < 0 = skip), weights [T, k].
    layer_index: a traced int32 scalar overriding `layer.layer` (a scan over the layers of one
    store, all of the same shape); else the layer is a static attribute of the call."""
    register()
    x_in = _act(jnp.asarray(x))
    if x_in.ndim != 2 or x_in.shape[1] != layer.hidden:
        raise ValueError(f"moe_experts: x must be [tokens, {layer.hidden}], got {x_in.shape}")
    ids = jnp.asarray(ids).astype(jnp.int32)
    weights = jnp.asarray(weights).astype(jnp.float32)
    if ids.shape != (x_in.shape[0], ids.shape[-1]) or weights.shape != ids.shape:
        raise ValueError(f"moe_experts: ids and weights must be [{x_in.shape[0]}, k], got {ids.shape}, {weights.shape}")
    out = jax.ShapeDtypeStruct(x_in.shape, x_in.dtype)
    if layer_index is None:
        y = jax.ffi.ffi_call(MOE_TARGET, out)(x_in, ids, weights, store=np.int64(layer.store), layer=np.int32(layer.layer))
    else:
        li = jnp.asarray(layer_index, jnp.int32).reshape(())
        y = jax.ffi.ffi_call(MOE_DYN_TARGET, out)(x_in, ids, weights, li, store=np.int64(layer.store))
    return y.astype(x.dtype) if y.dtype != x.dtype else y
