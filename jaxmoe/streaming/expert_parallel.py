"""SmallEP: one layer's routed experts split over an "expert" mesh axis, one `psum`.

A stream unit is a set of *windows*, one per device: window j reads the experts
[offset_j, offset_j + size) of the layer (one contiguous slice of the host copy: a zero-copy
view, transferred as is) and *owns* [lo_j, hi_j). Each device computes its owned experts for
every token of the chunk with the model's own `routed_experts` (tokens routed elsewhere get
an out-of-range id and weight 0: sorted last, no group, they add nothing), and one `psum`
over the mesh sums the devices' partial outputs.

Expert counts that the windows do not divide: all windows have the same size
ceil(E / n_windows) (as `shard_map` needs), and the last window is shifted left to end at
expert E, overlapping its neighbour, which still owns the overlap. So 9 experts on 2 devices
are read as [0, 5) and [4, 9), owned as [0, 5) and [5, 9): no padding copy, no dummy experts,
one expert transferred twice. A layer may also be split into `parts` sequential units (to
bound device memory): windows j = part * n_devices + device.

Attention and everything else outside the routed experts run replicated on the mesh (see
docs/ARCHITECTURE.md, "Stream-loading prefill", for the choice), or split by sequence with
`attention="sequence"` (streaming/sequence_split.py: tokens all-gathered before the experts,
the partial outputs reduce-scattered back to each device's share instead of the psum).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.model.moe import routed_experts

AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Window:
    offset: int  # first expert read
    lo: int  # first expert owned
    hi: int  # one past the last expert owned


def expert_windows(n_experts: int, n_windows: int) -> tuple[int, tuple[Window, ...]]:
    """(window size, windows) covering experts [0, n_experts) with n_windows equal-size reads."""
    if n_windows < 1 or n_experts < 1:
        raise ValueError(f"need >= 1 expert and window, got {n_experts} experts, {n_windows} windows")
    size = -(-n_experts // n_windows)
    wins = []
    for j in range(n_windows):
        lo, hi = min(j * size, n_experts), min((j + 1) * size, n_experts)
        wins.append(Window(offset=max(0, min(j * size, n_experts - size)), lo=lo, hi=hi))
    return size, tuple(wins)


def pinned_available(device: jax.Device) -> bool:
    """A pinned-host memory kind on an accelerator (on the CPU there is nothing to pin)."""
    if device.platform == "cpu":
        return False
    try:
        return any(m.kind == "pinned_host" for m in device.addressable_memories())
    except (AttributeError, NotImplementedError):
        return False


def _is_pinned(a: Any) -> bool:
    return isinstance(a, jax.Array) and getattr(a.sharding, "memory_kind", None) == "pinned_host"


def local_partial(x, ids, weights, experts, bounds):
    """Per device: its window's experts for all tokens x [N, H] (ids, weights [N, k]) -> its
    partial output [N, H], to be summed over the mesh."""
    offset, lo, hi = bounds[0, 0], bounds[0, 1], bounds[0, 2]
    mine = (ids >= lo) & (ids < hi)
    n_local = jax.tree.leaves(experts)[0].shape[0]
    local_ids = jnp.where(mine, ids - offset, n_local)  # out of range: counted in no group
    return routed_experts(experts, x, local_ids, jnp.where(mine, weights, 0.0))


def _local_routed(acc, x, ids, weights, experts, bounds):
    """Per device: its window's experts for all tokens; psum of the partial outputs, + acc."""
    return acc + jax.lax.psum(local_partial(x, ids, weights, experts, bounds), AXIS).astype(acc.dtype)


@functools.lru_cache(maxsize=8)
def _routed_program(devices: tuple[jax.Device, ...]):
    """(acc, x, ids, weights, experts [n*size, ...] sharded, bounds [n, 3] sharded) -> acc + routed,
    replicated. One jitted program per device tuple."""
    mesh = Mesh(np.array(devices), (AXIS,))
    return jax.jit(jax.shard_map(_local_routed, mesh=mesh, in_specs=(P(), P(), P(), P(), P(AXIS), P(AXIS)),
                                 out_specs=P()))


class ExpertMesh:
    """A 1-D mesh over `devices` (1 = SLP, 2 = SmallEP) and the streaming of windows onto it.

    pinned: stage host arrays through the device's pinned-host memory kind (None: where the
    platform offers one, i.e. on GPUs; sources already in pinned-host memory go straight by DMA).
    """

    def __init__(self, devices, *, pinned: bool | None = None):
        self.devices = tuple(devices)
        if not self.devices:
            raise ValueError("an expert mesh needs at least one device")
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.pinned = all(pinned_available(d) for d in self.devices) if pinned is None else bool(pinned)
        self._bounds: dict[tuple[int, int, int], jax.Array] = {}
        self.routed = _routed_program(self.devices)

    @property
    def size(self) -> int:
        return len(self.devices)

    def windows(self, n_experts: int, parts: int, part: int) -> tuple[int, tuple[Window, ...]]:
        size, wins = expert_windows(n_experts, parts * self.size)
        return size, wins[part * self.size : (part + 1) * self.size]

    def bounds(self, n_experts: int, parts: int, part: int) -> jax.Array:
        """int32 [n_devices, 3] (offset, lo, hi) per device, sharded over the expert axis."""
        key = (n_experts, parts, part)
        if key not in self._bounds:
            _, wins = self.windows(n_experts, parts, part)
            b = np.array([[w.offset, w.lo, w.hi] for w in wins], np.int32)
            self._bounds[key] = jax.device_put(b, self.sharded)
        return self._bounds[key]

    def _put(self, a: Any, device: jax.Device) -> jax.Array:
        if self.pinned and not _is_pinned(a):
            a = jax.device_put(a, SingleDeviceSharding(device, memory_kind="pinned_host"))
        if _is_pinned(a):
            return jax.device_put(a, SingleDeviceSharding(device, memory_kind="device"))
        return jax.device_put(a, device)

    def put_part(self, host_experts: Any, parts: int, part: int) -> Any:
        """Issue the transfers of one stream unit: each device gets its window of every leaf
        ([E, ...] host arrays: numpy views or host jax arrays), assembled into arrays sharded
        over the expert axis. Returns at once where the platform transfers asynchronously."""
        leaves = jax.tree.leaves(host_experts)
        n_experts = leaves[0].shape[0]
        size, wins = self.windows(n_experts, parts, part)

        def put_leaf(a):
            shards = [self._put(a[w.offset : w.offset + size], d) for w, d in zip(wins, self.devices)]
            return jax.make_array_from_single_device_arrays((self.size * size, *a.shape[1:]), self.sharded, shards)

        return jax.tree.map(put_leaf, host_experts)

    def put_replicated(self, host_tree: Any) -> Any:
        """Issue the transfers of a pytree from its host copy to every device of the mesh, by the
        experts' path (`put_part`: staged through pinned-host memory where the device offers it),
        assembled replicated (e.g. one MoE layer's MLA, router and shared experts, `stream_dense`)."""

        def put_leaf(a):
            shards = [self._put(a, d) for d in self.devices]
            return jax.make_array_from_single_device_arrays(np.shape(a), self.replicated, shards)

        return jax.tree.map(put_leaf, host_tree)

    def replicate(self, tree: Any) -> Any:
        """Put a pytree (weights, cache, activations) replicated on every device of the mesh."""
        return jax.device_put(tree, self.replicated)


@functools.lru_cache(maxsize=8)
def expert_mesh(devices: tuple[jax.Device, ...], pinned: bool | None = None) -> ExpertMesh:
    """One ExpertMesh (and its compiled program) per device tuple."""
    return ExpertMesh(devices, pinned=pinned)
