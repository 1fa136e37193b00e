"""jaxmoe.cpu: the FP8/BF16 CPU expert engine (cpu_ext) for jaxmoe.

- `HostMatrix` (host_matrix.py) / `ExpertStore` (expert_store.py): weights repacked in host
  memory, explicit create/free, integer handles; `HostLinear` / `HostExperts` are their leafless pytrees.
- `linear(x, w)` / `moe_experts(x, ids, weights, layer)` (ops.py): XLA custom calls that work
  inside `jax.jit` on the CPU platform.
- `to_cpu_placement(weights)` / `release(weights)` (placement.py): a loaded model whose large
  matmuls run on the kernels; importing this package registers the host weight types.
- `reference` (reference.py): float64 numpy references and error bounds; `_lib`: build + load.
"""

from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.handles import HostExperts, HostLinear
from jaxmoe.cpu.host_matrix import HostMatrix, free_all
from jaxmoe.cpu.ops import linear, moe_experts
from jaxmoe.cpu.placement import release, to_cpu_placement

__all__ = [
    "ExpertStore", "HostExperts", "HostLinear", "HostMatrix", "free_all",
    "linear", "moe_experts", "release", "to_cpu_placement",
]
