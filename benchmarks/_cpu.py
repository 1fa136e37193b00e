"""What CPU a benchmark ran on: its model name and class, from /proc/cpuinfo.

The class names the widest vector / matrix units the kernels and peers can use:
"avx512+amx" (AVX-512 F and AMX tiles), "avx512" (AVX-512 F), "avx2" (AVX2 with FMA) or
"other". The flags that decide which kernel path runs are kept as a short sorted list
(`KERNEL_FLAGS` present on this CPU), so a result JSON says why it ran the path it did.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CLASSES = ("avx2", "avx512", "avx512+amx")  # in order of capability; "other" below them
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                "avx512vbmi", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _first(field: str, text: str | None) -> str | None:
    """The value of the first `field : value` line of cpuinfo text (read from CPUINFO if None)."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """'model name' of the first processor, else platform.processor(), else "unknown"."""
    return _first("model name", cpuinfo) or platform.processor() or "unknown"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The 'flags' of the first processor (empty when /proc/cpuinfo is absent)."""
    return frozenset((_first("flags", cpuinfo) or "").split())


def cpu_class(flags: frozenset[str] | set[str] | None = None) -> str:
    """"avx512+amx", "avx512", "avx2" or "other" for a flag set (default: this CPU's)."""
    f = cpu_flags() if flags is None else flags
    if "avx512f" in f:
        return "avx512+amx" if "amx_tile" in f else "avx512"
    return "avx2" if {"avx2", "fma"} <= set(f) else "other"


def has_amx(flags: frozenset[str] | set[str] | None = None) -> bool:
    """True when the CPU exposes AMX tiles (amx_tile)."""
    return "amx_tile" in (cpu_flags() if flags is None else flags)


def cpu_header(cpuinfo: str | None = None) -> dict:
    """{"cpu": model name, "cpu_class": class, "cpu_flags": the KERNEL_FLAGS it has} for a
    result's env header."""
    flags = cpu_flags(cpuinfo)
    return {"cpu": cpu_model(cpuinfo), "cpu_class": cpu_class(flags),
            "cpu_flags": [f for f in KERNEL_FLAGS if f in flags]}
