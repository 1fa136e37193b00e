"""Fixtures for the cpu_ext tests: the library, and one fixture per ISA path.

Every path runs where the CPU can: scalar and AVX2 natively on any x86-64 machine with AVX2;
AVX-512 natively where the CPU has AVX512_BF16, else through the `emu512` build (the same
source compiled against SIMDe's portable AVX-512) when SIMDe headers are installed.
"""

from __future__ import annotations

import pytest

from jaxmoe.cpu import _lib

ISAS = ("scalar", "avx2", "avx512")


def native_for(isa: str) -> _lib.Native:
    """The library that can run `isa` here (skips the test if none can)."""
    nat = _lib.load("native")
    if nat.lib.jm_isa_supported(_lib.ISA_NAMES.index(isa)):
        return nat
    if isa == "avx512":
        try:
            return _lib.load("emu512")
        except Exception as e:  # no SIMDe headers on this machine
            pytest.skip(f"no AVX-512 BF16 here and no SIMDe emulation build: {e}")
    pytest.skip(f"this CPU cannot run the {isa} path")


@pytest.fixture(params=ISAS)
def isa_lib(request):
    """(isa name, Native library with that path selected)."""
    nat = native_for(request.param)
    with nat.use_isa(request.param):
        yield request.param, nat
