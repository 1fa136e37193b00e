"""Finds (building if needed) and loads the cpu_ext shared library through cffi (ABI mode).

cffi declares exactly the public header `cpu_ext/include/jaxmoe_cpu.h`. The library lives in
`jaxmoe/cpu/_native/` (built by `pip install` via setup.py, or here on first use when it is
missing or older than its sources); if that folder is read-only, in `$JAXMOE_CPU_BUILD_DIR`
or `~/.cache/jaxmoe/native`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import re
from pathlib import Path

import cffi

_HERE = Path(__file__).resolve().parent
_NATIVE = _HERE / "_native"
_REPO = _HERE.parent.parent
_CPU_EXT = _REPO / "cpu_ext"
_HEADER_CANDIDATES = (_CPU_EXT / "include" / "jaxmoe_cpu.h", _NATIVE / "jaxmoe_cpu.h")

ISA_NAMES = ("scalar", "avx2", "avx512")
PRECISION_NAMES = ("exact", "bf16")  # enum jm_precision of the header: JM_PREC_EXACT, JM_PREC_BF16
DT_F32, DT_BF16 = 0, 1  # enum jm_dtype of the header


class CpuExtError(RuntimeError):
    """An error reported by the native library (its message is jm_last_error())."""


def _header() -> Path:
    for h in _HEADER_CANDIDATES:
        if h.exists():
            return h
    raise CpuExtError("jaxmoe_cpu.h not found (neither cpu_ext/ sources nor an installed copy)")


def cdef_source(header: Path | None = None) -> str:
    """The header's declarations as cffi accepts them (preprocessor and C++ guards removed)."""
    out, skip = [], 0
    for line in (header or _header()).read_text().splitlines():
        s = line.strip()
        if s.startswith("#ifdef __cplusplus"):
            skip = 1
            continue
        if skip and s.startswith("#endif"):
            skip = 0
            continue
        if skip or s.startswith("#"):
            continue
        out.append(line)
    return re.sub(r"/\*.*?\*/", "", "\n".join(out), flags=re.S)


def _builder():
    spec = importlib.util.spec_from_file_location("_jaxmoe_cpu_build", _CPU_EXT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _out_dir() -> Path:
    env = os.environ.get("JAXMOE_CPU_BUILD_DIR")
    if env:
        return Path(env)
    if os.access(_HERE, os.W_OK):
        return _NATIVE
    return Path.home() / ".cache" / "jaxmoe" / "native"


def library_path(variant: str = "native") -> Path:
    """Path of an up-to-date library, building it first when needed (under a file lock)."""
    if not (_CPU_EXT / "build.py").exists():  # installed without sources
        lib = _NATIVE / "libjaxmoe_cpu.so"
        if not lib.exists():
            raise CpuExtError(f"{lib} is missing and cpu_ext sources are not available to build it")
        return lib
    b = _builder()
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    lib = out / b.LIB_NAMES[variant]
    want_ffi = b.ffi_include_dir() is not None
    if b.is_stale(lib) or (want_ffi and not b.manifest(lib).get("ffi")):
        with open(out / ".build.lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            if b.is_stale(lib) or (want_ffi and not b.manifest(lib).get("ffi")):
                b.build(out, variant)
    return lib


class Native:
    """The loaded library: `ffi`, `lib`, and helpers that turn return codes into exceptions."""

    def __init__(self, ffi: cffi.FFI, lib, variant: str):
        self.ffi, self.lib, self.variant = ffi, lib, variant

    def error(self) -> str:
        return self.ffi.string(self.lib.jm_last_error()).decode(errors="replace")

    def check(self, rc: int) -> None:
        """Raises CpuExtError with the library's message when rc != JM_OK."""
        if rc != 0:
            raise CpuExtError(self.error())

    def supported_isas(self) -> list[str]:
        return [n for i, n in enumerate(ISA_NAMES) if self.lib.jm_isa_supported(i)]

    def selected_isa(self) -> str:
        return ISA_NAMES[self.lib.jm_isa_selected()]

    @contextlib.contextmanager
    def use_isa(self, name: str):
        """Temporarily forces one ISA path (CpuExtError if this CPU cannot run it)."""
        if name not in ISA_NAMES:
            raise ValueError(f"unknown ISA {name!r}; one of {ISA_NAMES}")
        prev = self.lib.jm_isa_selected()
        self.check(self.lib.jm_set_isa(ISA_NAMES.index(name)))
        try:
            yield
        finally:
            self.lib.jm_set_isa(prev)

    def precision(self) -> str:
        """The precision asked for ("exact" or "bf16"; process-wide, like the ISA)."""
        return PRECISION_NAMES[self.lib.jm_precision()]

    def set_precision(self, name: str) -> None:
        """Sets the process-wide precision of the FP8/BF16 kernels: "exact" (exact weight
        decode, f32 activations and sums, on every ISA path) or "bf16" (activations rounded to
        bf16 and bf16 dot products where the selected path has them, else exact)."""
        self.check(self.lib.jm_set_precision(_precision_code(name)))

    @contextlib.contextmanager
    def use_precision(self, name: str):
        """Temporarily sets the precision ("exact" or "bf16"); restores the previous one."""
        code = _precision_code(name)
        prev = self.lib.jm_precision()
        self.check(self.lib.jm_set_precision(code))
        try:
            yield
        finally:
            self.lib.jm_set_precision(prev)

    def numerics(self) -> str:
        """The arithmetic of the FP8/BF16 kernels in use now (ISA and precision together):
        "bf16" (bf16 activations, vdpbf16ps) or "f32" (exact decode, f32 activations and sums).
        This, not the ISA, names the error bound a result obeys (reference.linear_bound)."""
        return "bf16" if self.lib.jm_bf16_dot() else "f32"

    def kernel_path(self) -> str:
        """The FP8/BF16 kernels in use now: "scalar", "avx2", "avx512" or "avx512-bf16"."""
        return self.ffi.string(self.lib.jm_kernel_path()).decode()

    @contextlib.contextmanager
    def use_threads(self, n: int):
        """Temporarily sets the pool's thread count (n <= 0: all cores)."""
        prev = self.lib.jm_num_threads()
        self.lib.jm_set_num_threads(n)
        try:
            yield
        finally:
            self.lib.jm_set_num_threads(prev)


def _precision_code(name: str) -> int:
    if name not in PRECISION_NAMES:
        raise ValueError(f"unknown CPU kernel precision {name!r}; one of {PRECISION_NAMES}")
    return PRECISION_NAMES.index(name)


@functools.cache
def load(variant: str = "native") -> Native:
    """The library variant ("native", or "emu512" for tests), built if needed; cached."""
    ffi = cffi.FFI()
    ffi.cdef(cdef_source())
    return Native(ffi, ffi.dlopen(str(library_path(variant))), variant)
