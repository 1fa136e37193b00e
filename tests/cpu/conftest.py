"""Fixtures for the cpu_ext tests: the library, one fixture per ISA path, one per
(ISA path, precision).

Every path the machine can execute runs: scalar, AVX2 and AVX-512 natively where the CPU has
them, plus always the `emu512` build (the AVX-512 source compiled against SIMDe's portable
AVX-512), so that path's layout and algebra are checked on any x86-64 machine. Without SIMDe
headers the emulated cases skip locally and FAIL under CI (CI=true): SIMDe comes with the
[test] extra (`simde-py`), so a missing emulation build is a broken setup, not a skip.

Precision ("exact" / "bf16", `Native.use_precision`) is a second dimension for the FP8/BF16
kernels: exact on every path; bf16 on the AVX-512 paths only, skipped where the library still
runs no bf16 dot product (`jm_bf16_dot()` == 0: no AVX512_BF16). A test checks its results
with the numerics that actually ran (`nat.numerics()`), never with the ISA's name.
"""

from __future__ import annotations

import os

import pytest

from jaxmoe.cpu import _lib

ISAS = ("scalar", "avx2", "avx512")
# (id, library variant, ISA): every native path, then the emulated AVX-512 build
PATHS = (("scalar", "native", "scalar"), ("avx2", "native", "avx2"), ("avx512", "native", "avx512"),
         ("emu512", "emu512", "avx512"))
# (id, library variant, ISA, precision): exact everywhere, bf16 where a bf16 dot can exist
PRECISION_PATHS = tuple((f"{pid}-exact", v, isa, "exact") for pid, v, isa in PATHS) + tuple(
    (f"{pid}-bf16", v, isa, "bf16") for pid, v, isa in PATHS if isa == "avx512")

_emu_error: list[str] = []  # the emulation build's failure, once per session (no rebuild per test)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def emulated() -> _lib.Native:
    """The emu512 build (built on first use); skips without SIMDe headers, fails under CI."""
    if not _emu_error:
        try:
            return _lib.load("emu512")
        except Exception as e:  # no SIMDe headers, or the build failed
            _emu_error.append(f"{type(e).__name__}: {e}")
    msg = f"the emulated AVX-512 build (emu512) cannot be made: {_emu_error[0]}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: SIMDe headers come with the [test] extra, simde-py)")
    pytest.skip(msg)


def native_for(isa: str, variant: str = "native") -> _lib.Native:
    """The library `variant` if it can run `isa` here (skips the test if it cannot)."""
    nat = emulated() if variant == "emu512" else _lib.load("native")
    if not nat.lib.jm_isa_supported(_lib.ISA_NAMES.index(isa)):
        pytest.skip(f"this CPU cannot run the {isa} path ({variant} build)")
    return nat


@pytest.fixture(params=PATHS, ids=[p[0] for p in PATHS])
def isa_lib(request):
    """(isa name, Native library with that path selected), for every path incl. emu512.
    The precision is left as it is: the INT4 kernels have one arithmetic."""
    _, variant, isa = request.param
    nat = native_for(isa, variant)
    with nat.use_isa(isa):
        yield isa, nat


@pytest.fixture(params=PRECISION_PATHS, ids=[p[0] for p in PRECISION_PATHS])
def path_lib(request):
    """(isa name, precision, Native library with both selected) for the FP8/BF16 kernels;
    check results against reference bounds with `nat.numerics()`."""
    _, variant, isa, precision = request.param
    nat = native_for(isa, variant)
    with nat.use_isa(isa), nat.use_precision(precision):
        if precision == "bf16" and not nat.lib.jm_bf16_dot():
            pytest.skip(f"the {isa} path of the {variant} build runs no bf16 dot product here")
        yield isa, precision, nat
