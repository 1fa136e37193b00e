"""Runtime presets: where each part of the model lives, and the devices a preset resolves to.

A `RuntimeConfig` comes from a preset in jaxmoe/configs/runtime/ (`cpu-only`, `gpu+cpu-experts`,
`2gpu+cpu-experts`), overridable by keyword. Accelerators hold embeddings, MLA, dense
layers, router, shared experts and lm_head; routed experts stay in host memory
(`routed_experts="host"`) or, for a model that fits, on the accelerator too.

Without a GPU, `simulate_accelerators=True` lets CPU devices stand in for accelerators
(tests run every preset that way with `jax_num_cpu_devices`): accelerators are CPU devices
0..n-1 and the host is CPU device n.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from jaxmoe.config import named_config_path
from jaxmoe.planning.strategies import REQUESTABLE

CPU_PRECISIONS = ("exact", "bf16")  # jaxmoe.cpu._lib.PRECISION_NAMES (not imported: no cffi here)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    preset: str = "cpu-only"
    accelerators: int = 0
    routed_experts: str = "host"  # "host" | "accelerator"
    overlap: bool = False
    n_slots: int = 4
    chunk_size: int = 64
    # prompt tokens per step while other requests decode (they wait for the step: smaller
    # means a lower time per output token for them); None: chunk_size
    decode_chunk_size: int | None = None
    # time per output token the decoders should keep while a prompt prefills beside them (ms;
    # cpu-only): each such step's prompt chunk is the widest (1, 2, 4, 8 tokens, then the width
    # buckets <= decode_chunk_size) whose time, predicted by the hardware profile's CPU step model
    # corrected by the steps measured (serving/step_model.py), fits (at least one token: the
    # prompt always advances). Changes the chunking, never the tokens. None: off
    tpot_target_ms: float | None = None
    max_len: int | None = None  # positions per sequence (None: from the memory budget, else min(model's, 4096))
    memory_budget_bytes: int | None = None  # the paged KV cache's bytes (None: n_slots x max_len positions)
    kv_block_size: int = 64  # positions per block of the paged KV cache
    # share full cache blocks between requests with the same prefix (serving/kv_blocks.py)
    prefix_caching: bool = True
    simulate_accelerators: bool = False
    # prefill strategy per request: "auto" (the planner's choice on `hardware`; the environment
    # variable JAXMOE_PREFILL_STRATEGY forces one) | "cpu" (the step path) | "slp" | "dslp"
    prefill_strategy: str = "auto"
    hardware: str | None = None  # jaxmoe/configs/hardware profile for the planner (None: from the devices)
    # stream-loaded prompts run in a worker thread beside the decode steps (serving/prefill_worker.py),
    # instead of one chunk per engine step before the other slots' step
    prefill_beside_decode: bool = False
    # precision of the CPU kernels' FP8/BF16 matmuls, process-wide: "exact" (exact weight decode,
    # f32 activations and sums, on every ISA) | "bf16" (activations rounded to bf16, bf16 dot
    # products where the CPU has them: AVX-512 BF16) | None (leave the library's setting: env
    # JAXMOE_CPU_PRECISION at load, else exact)
    cpu_precision: str | None = None

    def __post_init__(self):
        if self.prefill_strategy not in REQUESTABLE:
            raise ValueError(f"prefill_strategy must be one of {REQUESTABLE}, got {self.prefill_strategy!r}")
        if self.cpu_precision is not None and self.cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"cpu_precision must be one of {CPU_PRECISIONS} or None, got {self.cpu_precision!r}")
        if self.routed_experts not in ("host", "accelerator"):
            raise ValueError(f"routed_experts must be 'host' or 'accelerator', got {self.routed_experts!r}")
        if self.accelerators not in (0, 1, 2):
            raise ValueError(f"accelerators must be 0, 1 or 2, got {self.accelerators}")
        if self.chunk_size < 1 or (self.decode_chunk_size is not None and self.decode_chunk_size < 1):
            raise ValueError(f"chunk_size and decode_chunk_size must be >= 1, got {self.chunk_size}, {self.decode_chunk_size}")
        if isinstance(self.kv_block_size, bool) or not isinstance(self.kv_block_size, int) or self.kv_block_size < 1:
            raise ValueError(f"kv_block_size must be an integer >= 1, got {self.kv_block_size!r}")
        if self.tpot_target_ms is not None and not self.tpot_target_ms > 0:
            raise ValueError(f"tpot_target_ms must be > 0 (or None), got {self.tpot_target_ms}")
        if self.n_slots < 1 or (self.staged and self.n_slots < 2):
            raise ValueError(f"n_slots={self.n_slots} too small (staged execution needs >= 2: one per micro-batch)")

    @property
    def staged(self) -> bool:
        """Routed experts on the host while the rest runs on accelerators: stage programs."""
        return self.accelerators > 0 and self.routed_experts == "host"

    @classmethod
    def load(cls, preset: str | Path = "cpu-only", **overrides: Any) -> RuntimeConfig:
        path = named_config_path("runtime", preset, "runtime preset")
        d = json.loads(path.read_text())
        d.pop("description", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields) + sorted(k for k in overrides if k not in fields)
        if unknown:
            raise ValueError(f"unknown runtime option(s) {unknown}; known: {sorted(fields)}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=path.stem, **d)


@dataclasses.dataclass(frozen=True)
class Devices:
    accelerators: tuple[jax.Device, ...]  # empty for cpu-only
    host: jax.Device

    @property
    def main(self) -> jax.Device:
        return self.accelerators[0] if self.accelerators else self.host


def resolve_devices(rc: RuntimeConfig) -> Devices:
    cpus = jax.devices("cpu")
    n = rc.accelerators
    if n == 0:
        return Devices((), cpus[0])
    if rc.simulate_accelerators:
        if len(cpus) < n + 1:
            raise RuntimeError(
                f"simulating {n} accelerator(s) needs {n + 1} CPU devices, found {len(cpus)}: "
                f"set jax.config.update('jax_num_cpu_devices', {n + 1}) before using JAX"
            )
        return Devices(tuple(cpus[:n]), cpus[n])
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if len(gpus) < n:
        raise RuntimeError(
            f"runtime preset {rc.preset!r} needs {n} GPU(s), found {len(gpus)}; "
            f"use preset 'cpu-only' (or simulate_accelerators=True for testing)"
        )
    return Devices(tuple(gpus[:n]), cpus[0])
