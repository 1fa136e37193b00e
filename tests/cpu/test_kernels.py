"""cpu_ext linear kernels vs the float64 numpy reference, on every (ISA path, precision).

Tolerances are the rigorous bounds of jaxmoe.cpu.reference (module docstring there), chosen by
the numerics that ran (`nat.numerics()`): "f32" gamma_{K+5} sum|w x|; "bf16" adds 2^-8 sum|w x|
for rounding the activations to bf16 and the mass of the flushed subnormal FP8 codes. A bf16
output adds its own rounding, 2^-8 |y|.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmoe.cpu import _lib
from jaxmoe.cpu import reference as R
from jaxmoe.cpu._lib import CpuExtError
from jaxmoe.cpu.host_matrix import HostMatrix

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_fp8(rng, n, k, nan_codes=True):
    q = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    if not nan_codes:
        q[(q & 0x7F) == 0x7F] = 0x7E
    scale = np.exp2(rng.uniform(-10, 2, size=(-(-n // 128), -(-k // 128)))).astype(np.float32)
    return q, scale


@contextlib.contextmanager
def gemm_rows(nat, m):
    """jm_linear / jm_moe take the GEMM path from m token rows on (-1: never) inside the block."""
    prev = nat.lib.jm_set_gemm_min_rows(m)
    try:
        yield
    finally:
        nat.lib.jm_set_gemm_min_rows(prev)


def check_close(y, ref, bound, what):
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def test_all_256_codes_decode(path_lib):
    """Row 0 holds every code once; one-hot activations read each back: exact with f32
    numerics (0x7f/0xff = +-480 by contract), subnormals flushed (or, under SIMDe's
    emulation, maybe not) with bf16 numerics, on the GEMM and the GEMV path alike."""
    isa, precision, nat = path_lib
    q = np.zeros((3, 256), np.uint8)
    q[0] = np.arange(256, dtype=np.uint8)
    m = HostMatrix.fp8(q, np.ones((1, 2), np.float32), native=nat)
    try:
        y = m.linear(np.eye(256, dtype=np.float32))[:, 0]
        with gemm_rows(nat, -1):  # the GEMV chunks too (256 rows take the GEMM path)
            y_gemv = m.linear(np.eye(256, dtype=np.float32))[:, 0]
    finally:
        m.free()
    want = R.fp8_decode(np.arange(256, dtype=np.uint8))
    assert want[0x7F] == 480 and want[0xFF] == -480
    sub = R.is_subnormal(np.arange(256, dtype=np.uint8))
    if nat.numerics() == "bf16":  # vdpbf16ps flushes them (SIMDe's emulation may not): 0 or exact
        for got in (y, y_gemv):
            assert np.all((got[sub] == 0) | (got[sub] == want[sub]))
        y, y_gemv, want = y[~sub], y_gemv[~sub], want[~sub]
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y_gemv, want)


@SETTINGS
@given(m=st.integers(1, 64), n=st.integers(1, 300), k=st.integers(1, 400), seed=st.integers(0, 2**31),
       bf16_io=st.booleans(), gemm=st.booleans())
def test_fp8_linear_matches_reference(path_lib, m, n, k, seed, bf16_io, gemm):
    """Both multi-token paths: GEMV passes over token chunks and the GEMM path (forced from
    one row on, so every micro-kernel row count 1..6 and row tail is exercised)."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(seed)
    q, scale = random_fp8(rng, n, k)
    x = (rng.standard_normal((m, k)) * np.exp2(rng.uniform(-4, 4))).astype(np.float32)
    x[rng.random(m) < 0.2] = 0.0  # zero rows
    q[rng.random(n) < 0.1] = 0  # zero weight rows
    if bf16_io:
        x = x.astype(ml_dtypes.bfloat16)
    w = HostMatrix.fp8(q, scale, native=nat)
    try:
        with gemm_rows(nat, 1 if gemm else -1):
            y = w.linear(x, out_dtype=ml_dtypes.bfloat16 if bf16_io else np.float32)
    finally:
        w.free()
    w64 = R.fp8_dequant(q, scale)
    ref = R.linear(x, w64)
    bound = R.linear_bound(x, w64, nat.numerics(), R.is_subnormal(q))
    if bf16_io:
        bound = bound + 2.0**-8 * np.abs(ref)  # output rounding, with the bound's own slack
    check_close(y, ref, bound, f"{isa}/{precision} fp8 m={m} n={n} k={k}")
    assert np.all(y[np.all(x == 0, axis=1)] == 0) and np.all(y[:, np.all(q == 0, axis=1)] == 0)


@SETTINGS
@given(m=st.integers(1, 40), n=st.integers(1, 200), k=st.integers(1, 300), seed=st.integers(0, 2**31),
       gemm=st.booleans())
def test_bf16_linear_matches_reference(path_lib, m, n, k, seed, gemm):
    isa, precision, nat = path_lib
    rng = np.random.default_rng(seed)
    wb = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = HostMatrix.bf16(wb, native=nat)
    try:
        with gemm_rows(nat, 1 if gemm else -1):
            y = w.linear(x)
    finally:
        w.free()
    w64 = R.bf16_values(wb)
    check_close(y, R.linear(x, w64), R.linear_bound(x, w64, nat.numerics()), f"{isa}/{precision} bf16 m={m} n={n} k={k}")


def test_long_k_and_many_tokens(path_lib):
    """K = 7168 (DeepSeek's hidden size), M = 37 (three token chunks), N not a multiple of 4."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(7)
    n, k, m = 130, 7168, 37 if isa != "scalar" else 5
    q, scale = random_fp8(rng, n, k, nan_codes=False)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = HostMatrix.fp8(q, scale, native=nat)
    try:
        y = w.linear(x)
    finally:
        w.free()
    w64 = R.fp8_dequant(q, scale)
    check_close(y, R.linear(x, w64), R.linear_bound(x, w64, nat.numerics(), R.is_subnormal(q)), f"{isa}/{precision}")


@pytest.mark.parametrize("gemm", [False, True])
def test_result_independent_of_thread_count(path_lib, gemm):
    """Fixed tiles and summation order: the GEMM path also splits tokens across tasks when
    there are few panels (n = 70: 2 panels), which must not change a bit either."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(3)
    for n, m in ((515, 9), (70, 50)):
        q, scale = random_fp8(rng, n, 300)
        x = rng.standard_normal((m, 300)).astype(np.float32)
        w = HostMatrix.fp8(q, scale, native=nat)
        try:
            with gemm_rows(nat, 1 if gemm else -1):
                with nat.use_threads(1):
                    y1 = w.linear(x)
                with nat.use_threads(3):
                    y3 = w.linear(x)
        finally:
            w.free()
        np.testing.assert_array_equal(y1, y3)


def test_gemm_long_k_many_tokens(path_lib):
    """The GEMM path at DeepSeek's K = 7168 with 130 tokens (22 micro-kernel row groups, a
    tail of 4) and n = 200 (a partial 16-row sub-panel and a partial 64-row panel)."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(11)
    n, k, m = (200, 7168, 130) if isa != "scalar" else (40, 1000, 13)
    q, scale = random_fp8(rng, n, k, nan_codes=False)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = HostMatrix.fp8(q, scale, native=nat)
    try:
        with gemm_rows(nat, 1):
            y = w.linear(x)
    finally:
        w.free()
    w64 = R.fp8_dequant(q, scale)
    check_close(y, R.linear(x, w64), R.linear_bound(x, w64, nat.numerics(), R.is_subnormal(q)), f"{isa}/{precision} gemm")


def test_errors_are_exceptions():
    rng = np.random.default_rng(0)
    q, scale = random_fp8(rng, 10, 20)
    with pytest.raises(ValueError, match="scale shape"):
        HostMatrix.fp8(q, np.ones((2, 2), np.float32))
    w = HostMatrix.fp8(q, scale)
    with pytest.raises(ValueError, match="features"):
        w.linear(np.ones((2, 21), np.float32))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        w.linear(np.ones((2, 20), np.float64))
    ptr = w._ptr
    w.free()
    nat = w._nat
    with pytest.raises(CpuExtError, match="not a live matrix"):
        nat.check(nat.lib.jm_linear(ptr, nat.ffi.NULL, 0, 1, nat.ffi.NULL, 0))
    assert nat.lib.jm_matrix_from_handle(12345) == nat.ffi.NULL
    assert "not a live jaxmoe matrix handle" in nat.error()
    with pytest.raises(CpuExtError, match="shape must be positive"):
        HostMatrix.bf16(np.zeros((0, 5), ml_dtypes.bfloat16))


def test_isa_forcing():
    nat = _lib.load()
    assert "scalar" in nat.supported_isas()
    for isa in nat.supported_isas():
        with nat.use_isa(isa):
            assert nat.selected_isa() == isa
    if "avx512" not in nat.supported_isas():
        with pytest.raises(CpuExtError, match="cannot run the avx512 path"):
            with nat.use_isa("avx512"):
                pass


@pytest.mark.parametrize("env,want", [("scalar", "scalar"), ("bogus", None)])
def test_isa_env_var(env, want):
    """JAXMOE_CPU_ISA picks the path at load time; an unknown or unsupported value warns and
    falls back to the best path."""
    nat = _lib.load()
    if want and want not in nat.supported_isas():
        pytest.skip(f"no {want} here")
    code = "from jaxmoe.cpu import _lib; print(_lib.load().selected_isa())"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAXMOE_CPU_ISA": env},
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == (want or nat.supported_isas()[-1])
    if want is None:
        assert "ignoring JAXMOE_CPU_ISA=bogus" in res.stderr


def test_profile_counters():
    """JAXMOE_CPU_PROFILE=1: native time, calls and token rows per entry point and path."""
    code = """
import numpy as np
from jaxmoe.cpu import _lib
from jaxmoe.cpu.host_matrix import HostMatrix
nat = _lib.load()
lib, ffi = nat.lib, nat.ffi
q = np.random.default_rng(0).integers(0, 256, (70, 130), dtype=np.uint8)
w = HostMatrix.fp8(q, np.ones((1, 2), np.float32))
lib.jm_set_gemm_min_rows(6)
w.linear(np.ones((1, 130), np.float32)); w.linear(np.ones((5, 130), np.float32)); w.linear(np.ones((9, 130), np.float32))
buf = ffi.new("int64_t[18]")
n = lib.jm_profile_read(buf, 6, 1)
names = [ffi.string(lib.jm_profile_name(i)).decode() for i in range(n)]
print(names[0], buf[1], buf[2], names[1], buf[4], buf[5], buf[0] > 0, buf[3] > 0)
lib.jm_profile_read(buf, 6, 0)
print(buf[1], buf[4])
"""
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAXMOE_CPU_PROFILE": "1"},
                         capture_output=True, text=True, check=True)
    first, second = res.stdout.strip().splitlines()
    assert first.split() == ["linear", "2", "6", "linear_gemm", "1", "9", "True", "True"]
    assert second.split() == ["0", "0"]  # reset
