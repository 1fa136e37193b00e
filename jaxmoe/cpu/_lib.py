"""Finds (building if needed) and loads the cpu_ext shared library through cffi (ABI mode).

cffi declares exactly the public header `cpu_ext/include/jaxmoe_cpu.h`. Where the library is:
- a source checkout (editable install; `cpu_ext/` beside the package): `jaxmoe/cpu/_native/`,
  built here on first use when it is missing or older than its sources;
- an installed wheel: the library the wheel carries in `jaxmoe/cpu/_native/`, with a copy of
  the header and of the cpu_ext sources (`_native/cpu_ext/`); rebuilt from those only when it
  lacks the XLA FFI bindings (a wheel built where jax was not importable, e.g. pip's isolated
  build) and jax is here now.
A rebuild goes to `$JAXMOE_CPU_BUILD_DIR` if set, else into `jaxmoe/cpu/_native/` when that
folder is writable, else `<cache>/native/<digest of the sources>/` (`<cache>`:
$JAXMOE_CACHE_DIR or ~/.cache/jaxmoe), under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import cffi

from jaxmoe.config import cache_dir

_HERE = Path(__file__).resolve().parent
_NATIVE = _HERE / "_native"
_REPO_CPU_EXT = _HERE.parent.parent / "cpu_ext"  # a source checkout
_PACKAGED_CPU_EXT = _NATIVE / "cpu_ext"  # the copy an installed wheel carries
_CPU_EXT = _REPO_CPU_EXT if (_REPO_CPU_EXT / "include" / "jaxmoe_cpu.h").exists() else _PACKAGED_CPU_EXT
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


def _sources_digest(b) -> str:
    h = hashlib.sha256()
    for p in b.sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _out_dir(b) -> Path:
    env = os.environ.get("JAXMOE_CPU_BUILD_DIR")
    if env:
        return Path(env)
    if os.access(_NATIVE if _NATIVE.exists() else _HERE, os.W_OK):
        return _NATIVE
    return cache_dir() / "native" / _sources_digest(b)


def library_path(variant: str = "native") -> Path:
    """Path of an up-to-date library, building it first when needed (under a file lock)."""
    if not (_CPU_EXT / "build.py").exists():  # installed without sources
        lib = _NATIVE / "libjaxmoe_cpu.so"
        if not lib.exists():
            raise CpuExtError(f"{lib} is missing and cpu_ext sources are not available to build it")
        return lib
    b = _builder()
    want_ffi = b.ffi_include_dir() is not None
    installed = _CPU_EXT == _PACKAGED_CPU_EXT  # the sources are the wheel's own: no mtimes to compare

    def usable(lib: Path) -> bool:
        if want_ffi and not b.manifest(lib).get("ffi"):
            return False
        return lib.exists() if installed else not b.is_stale(lib)

    shipped = _NATIVE / b.LIB_NAMES[variant]
    if installed and usable(shipped):
        return shipped
    out = _out_dir(b)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / b.LIB_NAMES[variant]
    if not usable(lib):
        with open(out / ".build.lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            if not usable(lib):
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
