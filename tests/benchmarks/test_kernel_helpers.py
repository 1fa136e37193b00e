"""The kernel benchmarks' helpers without the native library: the CPU header from cpuinfo
text (benchmarks/_cpu.py), the FP8 weight draws and their code statistics
(benchmarks/_fp8_draws.py), and the kernel-path / precision logic on a fake library under
jaxmoe.cpu._lib.Native (benchmarks/_kernel_path.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _cpu as C  # noqa: E402
from benchmarks import _fp8_draws as D  # noqa: E402
from benchmarks import _kernel_path as KP  # noqa: E402
from jaxmoe.cpu._lib import Native  # noqa: E402
from jaxmoe.quant import FP8_DTYPE  # noqa: E402

AVX2 = "avx2 fma f16c sse4_2"
AVX512 = AVX2 + " avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
AMX = AVX512 + " avx512_fp16 amx_bf16 amx_tile amx_int8"


def _cpuinfo(model: str, flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize(("flags", "cls"), [(AVX2, "avx2"), (AVX512, "avx512"), (AMX, "avx512+amx"), ("sse2", "other")])
def test_cpu_class(flags, cls):
    assert C.cpu_class(frozenset(flags.split())) == cls
    assert C.has_amx(frozenset(flags.split())) is (cls == "avx512+amx")


def test_cpu_header():
    h = C.cpu_header(_cpuinfo("Intel(R) Xeon(R) Platinum 8480+", AMX))
    assert h["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and h["cpu_class"] == "avx512+amx"
    assert h["cpu_flags"] == [f for f in C.KERNEL_FLAGS if f in AMX.split()]  # KERNEL_FLAGS order, no others
    assert "sse4_2" not in h["cpu_flags"]
    assert C.cpu_flags("") == frozenset()
    here = C.cpu_header()  # this machine: some class, a model name
    assert here["cpu_class"] in (*C.CLASSES, "other") and here["cpu"]


def test_code_stats():
    codes = np.array([0x00, 0x80, 0x01, 0x87, 0x08, 0x7E, 0xF0, 0x05], np.uint8)
    st = D.CodeStats()
    st.add(codes)
    st.add(codes.view(np.int8))  # any 1-byte view
    assert st.as_dict() == {"codes": 16, "subnormal_frac": 3 / 8, "zero_frac": 2 / 8}


def test_draws():
    rng = np.random.default_rng(0)
    q, s = D.checkpoint_like(rng, 256, 384)
    assert q.dtype == np.uint8 and q.shape == (256, 384) and s.shape == (2, 3) and s.dtype == np.float32
    st = D.CodeStats()
    st.add(q)
    assert st.as_dict()["subnormal_frac"] < 2e-3  # ~1e-4 for Gaussian blocks scaled by their amax
    assert not ((q & 0x7F) == 0x7F).any()  # no NaN codes
    blocks = np.abs(q.view(FP8_DTYPE).astype(np.float32)).reshape(2, 128, 3, 128).max(axis=(1, 3))
    assert (blocks == 448).all()  # each 128x128 block scaled by its amax
    u, su = D.draw("uniform_codes", rng, 256, 384)
    st = D.CodeStats()
    st.add(u)
    assert 0.04 < st.as_dict()["subnormal_frac"] < 0.07 and not ((u & 0x7F) == 0x7F).any() and su.shape == (2, 3)
    with pytest.raises(ValueError, match="unknown FP8 draw"):
        D.draw("laplace", rng, 8, 8)


class _Lib:
    """A stand-in for the cffi library's ISA and precision entry points."""

    def __init__(self, isa: int, bf16: bool):
        self._isa, self._prec, self._bf16 = isa, 0, bf16
        self.jm_precision = lambda: self._prec
        self.jm_set_precision = self._set
        self.jm_bf16_dot = lambda: int(self._bf16 and self._prec == 1)
        self.jm_kernel_path = lambda: ("avx512-bf16" if self.jm_bf16_dot() else ("scalar", "avx2", "avx512")[self._isa])

    def _set(self, p: int) -> int:
        self._prec = p
        return 0

    def jm_isa_selected(self):
        return self._isa


def _Nat(lib) -> Native:
    return Native(type("ffi", (), {"string": staticmethod(lambda s: s.encode())})(), lib, "fake")


def test_kernel_path_with_precision():
    nat = _Nat(_Lib(2, bf16=True))
    assert KP.precisions(nat, None) == ["exact", "bf16"] and KP.precisions(nat, "bf16") == ["bf16"]
    assert nat.lib.jm_precision() == 0  # probing bf16 restored exact
    assert KP.kernel_info(nat) == {"isa": "avx512", "precision": "exact", "bf16_dot": False, "kernel_path": "avx512"}
    with KP.precision(nat, "bf16"):
        assert KP.kernel_info(nat) == {"isa": "avx512", "precision": "bf16", "bf16_dot": True,
                                       "kernel_path": "avx512-bf16"}
    assert nat.lib.jm_precision() == 0
    avx2 = _Nat(_Lib(1, bf16=False))  # no bf16 dot: exact by default, both when asked
    assert KP.precisions(avx2, None) == ["exact"] and KP.precisions(avx2, "both") == ["exact", "bf16"]
    with KP.precision(avx2, "bf16"):
        assert KP.kernel_info(avx2)["kernel_path"] == "avx2" and KP.kernel_info(avx2)["bf16_dot"] is False


def test_suffix_and_arg():
    assert KP.suffix(None) == KP.suffix("exact") == "" and KP.suffix("bf16") == "_bf16"
    assert KP.suffixed({"a": 1}, "bf16") == {"a_bf16": 1} and KP.suffixed({"a": 1}, "exact") == {"a": 1}
    ap = argparse.ArgumentParser()
    KP.add_precision_arg(ap)
    assert ap.parse_args([]).precision is None and ap.parse_args(["--precision", "both"]).precision == "both"
    with pytest.raises(SystemExit):
        ap.parse_args(["--precision", "fp16"])
