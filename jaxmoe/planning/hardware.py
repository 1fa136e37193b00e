"""Hardware profiles (jaxmoe/configs/hardware/*.json) for the performance model of planning/planner.py.

A profile: the CPU (cores, clock, FLOP/cycle in the expert kernels' arithmetic, read
bandwidth), the GPUs (count, memory, BF16/FP8 dense peaks, memory bandwidth, effective
host->device PCIe rate), and the efficiencies that turn peaks into expected rates.

The efficiencies are constants, documented in each json's "sources", to be replaced by
measured figures: a profile listing "kernels.json" in "calibrate_from" takes
`cpu_gemv_frac_of_read` from the calibration file when it exists (`Hardware.calibrated_from`
records it); without one the profile's own figures apply. The calibration file
(`calibration_path`): the `calibration=` argument of `load_hardware`, else $JAXMOE_CALIBRATION,
else <cache>/calibration/kernels.json, <cache> being $JAXMOE_CACHE_DIR or ~/.cache/jaxmoe; a full
run of `python -m benchmarks.kernels` writes it there (its {"metrics": {...}} JSON; the source
tree is never read). `Hardware.with_efficiency(...)` overrides any of them.

A profile measured on its box can add a "cpu_kernels" block: the coefficients of the CPU-only
step model (planning/kernel_model.py; `Hardware.kernels`, `with_kernels(...)`), which the
planner then uses for CPU-only prefill and decode instead of its generic formulas.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

from jaxmoe.config import cache_dir, named_config_path
from jaxmoe.planning.kernel_model import CpuKernels

CALIBRATION_ENV = "JAXMOE_CALIBRATION"


def calibration_path(path: str | Path | None = None) -> Path:
    """Where this box's measured calibration is (it may not exist): `path` if given, else
    $JAXMOE_CALIBRATION, else <cache>/calibration/kernels.json (config.cache_dir())."""
    if path is None:
        path = os.environ.get(CALIBRATION_ENV) or cache_dir() / "calibration" / "kernels.json"
    return Path(path).expanduser()


@dataclasses.dataclass(frozen=True)
class Cpu:
    name: str
    cores: int  # all sockets
    ghz: float  # all-core clock under vector load
    flops_per_cycle: float  # per core, in the expert kernels' arithmetic
    read_gbps: float  # read-only bandwidth of the whole box (all sockets, NUMA-local)
    sockets: int = 1


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    count: int
    memory_gb: float
    bf16_tflops: float  # dense, fp32 accumulate
    fp8_tflops: float  # dense, fp32 accumulate
    mem_gbps: float
    pcie_gbps: float  # effective host -> device, per GPU
    shared_compute: bool = False  # fake devices sharing the host's cores (tests/benchmarks on a CPU box)


@dataclasses.dataclass(frozen=True)
class Efficiency:
    gpu_gemm: float = 0.6  # of fp8 (FP8 GEMM kernels) or bf16 peak, large M
    gpu_gemm_dtype: str = "fp8"  # "bf16": weights dequantized then bf16 matmuls (jaxmoe's XLA path)
    gpu_attention: float = 0.5  # of bf16 peak, fused causal prefill attention
    gpu_mem: float = 0.8  # of memory bandwidth, for weight reads
    gpu_usable_memory: float = 0.92
    cpu_gemm: float = 0.5  # of cpu peak, expert GEMM (prefill)
    cpu_gemv_frac_of_read: float = 0.9  # expert GEMV (decode) vs a read-only pass
    layer_overhead_us: float = 30.0  # per layer per prefill chunk: dispatch, synchronisation
    decode_layer_overhead_us: float = 40.0  # per MoE layer per decode step: GPU <-> CPU round trip


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    cpu: Cpu
    gpu: Gpu | None
    efficiency: Efficiency
    description: str = ""
    calibrated_from: tuple[str, ...] = ()
    kernels: CpuKernels | None = None  # the CPU-only step model (planning/kernel_model.py), where measured

    def with_kernels(self, **changes: Any) -> Hardware:
        if self.kernels is None:
            raise ValueError(f"{self.name} has no cpu_kernels block")
        return dataclasses.replace(self, kernels=dataclasses.replace(self.kernels, **changes))

    @property
    def n_gpus(self) -> int:
        return 0 if self.gpu is None else self.gpu.count

    def with_efficiency(self, **changes: Any) -> Hardware:
        return dataclasses.replace(self, efficiency=dataclasses.replace(self.efficiency, **changes))

    def with_gpus(self, count: int) -> Hardware:
        if self.gpu is None:
            raise ValueError(f"{self.name} has no GPU")
        return dataclasses.replace(self, gpu=dataclasses.replace(self.gpu, count=count))


def load_hardware(name: str | Path = "reference-box", *, calibrate: bool = True,
                  calibration: str | Path | None = None) -> Hardware:
    """A profile from jaxmoe/configs/hardware/ (by name) or a json path; calibrated from
    `calibration_path(calibration)` when the profile asks for it, `calibrate` is set and the file
    exists."""
    path = named_config_path("hardware", name, "hardware profile")
    d = json.loads(path.read_text())
    eff = d.get("efficiency", {})
    calibrated: list[str] = []
    cal = calibration_path(calibration)
    if calibrate and "kernels.json" in d.get("calibrate_from", ()) and cal.is_file():
        try:
            frac = json.loads(cal.read_text()).get("metrics", {}).get("fp8_gemv_m1_frac_of_read")
        except (OSError, ValueError, AttributeError) as e:  # the profile's own figures, then
            warnings.warn(f"jaxmoe: calibration {cal} not used: {e}", stacklevel=2)
            frac = None
        if frac:
            eff = {**eff, "cpu_gemv_frac_of_read": min(1.0, max(0.2, float(frac)))}
            calibrated.append(f"{cal}: cpu_gemv_frac_of_read")
    gpu = d.get("gpu")
    return Hardware(
        name=d.get("name", path.stem), description=d.get("description", ""),
        cpu=Cpu(**_fields(Cpu, d["cpu"])), gpu=Gpu(**_fields(Gpu, gpu)) if gpu and gpu.get("count") else None,
        efficiency=Efficiency(**_fields(Efficiency, eff)), calibrated_from=tuple(calibrated),
        kernels=CpuKernels(**_fields(CpuKernels, d["cpu_kernels"])) if d.get("cpu_kernels") else None,
    )


def _fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
