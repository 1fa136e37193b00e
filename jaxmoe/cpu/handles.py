"""Pytrees that name native host-resident weights inside a Weights pytree.

They carry only the integer handle and shapes as static (non-leaf) data, so they pass through
`jax.jit` and `jax.tree_util` unchanged; the owners (and the memory) are in `host_matrix.py`
and `expert_store.py`.
"""

from __future__ import annotations

from flax import struct


@struct.dataclass
class HostLinear:
    """A Linear weight [n, k] resident in host memory, run by cpu_ext (pytree without leaves)."""

    handle: int = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)


@struct.dataclass
class HostExperts:
    """One layer's routed experts in an ExpertStore (pytree without leaves)."""

    store: int = struct.field(pytree_node=False)
    layer: int = struct.field(pytree_node=False)
    n_experts: int = struct.field(pytree_node=False)
    hidden: int = struct.field(pytree_node=False)
    inter: int = struct.field(pytree_node=False)



@struct.dataclass
class HostGroupedLinear:
    """g Linear weights [n, k] of one shape in host memory (a HostGroup; pytree without leaves)."""

    handle: int = struct.field(pytree_node=False)
    g: int = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)
