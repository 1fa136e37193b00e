"""Batch invariance (the contract of cpu_ext/include/jaxmoe_cpu.h): an output row's bits do
not depend on the other rows of the call, on the row count, or on whether the GEMV or the
GEMM path ran -- on every (ISA path, precision), the emulated AVX-512 build included.

Compared bit for bit (float32 viewed as uint32): jm_linear on FP8, BF16 and INT4 matrices with
M rows vs each row alone (M = 1), the GEMM path forced (`jm_set_gemm_min_rows(1)`) vs the GEMV
path (`-1`), and the fused MoE (jm_moe, FP8 experts): a token alone vs inside a batch whose
other tokens crowd the same experts (the GEMM path at the default threshold).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxmoe import quant_int4 as Q
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.host_matrix import HostMatrix
from tests.cpu.conftest import native_for
from tests.cpu.test_kernels import gemm_rows, random_fp8
from tests.cpu.test_moe import make_experts

ROWS = (1, 2, 3, 5, 16, 17, 40, 64)
SHAPES = ((300, 400), (300, 384), (70, 130))  # (n, k): k = 400 and 130 are not multiples of 128


def bits(y: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(y, np.float32).view(np.uint32)


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_array_equal(bits(got), bits(want), err_msg=what)


def matrix(fmt: str, n: int, k: int, nat, rng) -> HostMatrix:
    if fmt == "fp8":
        return HostMatrix.fp8(*random_fp8(rng, n, k, nan_codes=False), native=nat)
    if fmt == "bf16":
        return HostMatrix.bf16(rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16), native=nat)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = Q.quantize_int4(w, 32)
    return HostMatrix.int4(q, s, k, 32, native=nat)


def activations(rng, m: int, k: int) -> np.ndarray:
    """Rows of very different magnitudes (a row's scaling must stay its own), one zero row."""
    x = rng.standard_normal((m, k)) * np.exp2(rng.uniform(-6, 6, (m, 1)))
    x[m // 2] = 0.0
    return x.astype(np.float32)


def alone(w: HostMatrix, x: np.ndarray) -> np.ndarray:
    return np.concatenate([w.linear(x[i : i + 1]) for i in range(x.shape[0])])


def check_linear(w: HostMatrix, x: np.ndarray, nat, what: str) -> None:
    """(a) M rows == each row alone (GEMV path, then the default threshold), and (b) the GEMM
    path forced == the GEMV path, for every M of ROWS and for one row."""
    with gemm_rows(nat, -1):
        ref = alone(w, x)  # every row by itself on the GEMV path
    for m in ROWS:
        with gemm_rows(nat, -1):
            gemv = w.linear(x[:m])
        assert_same_bits(gemv, ref[:m], f"{what}: {m} rows on the GEMV path vs each alone")
        assert_same_bits(w.linear(x[:m]), ref[:m], f"{what}: {m} rows vs each alone (default threshold)")
        with gemm_rows(nat, 1):
            gemm = w.linear(x[:m])
        assert_same_bits(gemm, gemv, f"{what}: {m} rows, GEMM vs GEMV")
    with gemm_rows(nat, 1):
        assert_same_bits(alone(w, x), ref, f"{what}: one row, GEMM vs GEMV")


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear_rows_are_independent(path_lib, fmt, n, k):
    isa, precision, nat = path_lib
    rng = np.random.default_rng(n * 7 + k)
    w = matrix(fmt, n, k, nat, rng)
    try:
        check_linear(w, activations(rng, max(ROWS), k), nat, f"{isa}/{precision} {fmt} [{n},{k}]")
    finally:
        w.free()


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_linear_rows_are_independent(isa_lib, n, k):
    """INT4 quantizes each row's activations by itself (per group), so its rows are
    independent too; the INT4 GEMM path (from 2/3 of the GEMM threshold) vs its GEMV."""
    isa, nat = isa_lib
    rng = np.random.default_rng(n * 11 + k)
    w = matrix("int4", n, k, nat, rng)
    try:
        check_linear(w, activations(rng, max(ROWS), k), nat, f"{isa} int4 [{n},{k}]")
    finally:
        w.free()


def crowded_routing(rng, t: int, n_experts: int, top_k: int, hot: int):
    """Every token picks its top_k experts among the first `hot`: many tokens per expert."""
    ids = np.stack([rng.permutation(hot)[:top_k] for _ in range(t)]).astype(np.int32)
    return ids, rng.random((t, top_k)).astype(np.float32)


@pytest.mark.parametrize("hidden,inter", [(400, 256), (256, 130)])
def test_moe_token_alone_equals_token_in_a_crowd(path_lib, hidden, inter):
    """FP8 experts: each token of a 64-token batch (3 hot experts of 8, ~43 rows each: the GEMM
    path at the default threshold) == the same token alone (GEMV) == the batch with the GEMM
    path forced or disabled; smaller batches (2, 17 tokens) agree too."""
    isa, precision, nat = path_lib
    rng = np.random.default_rng(hidden + inter)
    n_experts, top_k, t = 8, 2, 64
    (g, u, d), _, _ = make_experts(rng, n_experts, hidden, inter)
    ids, weights = crowded_routing(rng, t, n_experts, top_k, hot=3)
    x = activations(rng, t, hidden)
    what = f"{isa}/{precision} moe [{hidden},{inter}]"
    with ExpertStore(1, native=nat) as store:
        store.add_layer(0, g, u, d)
        with gemm_rows(nat, -1):
            ref = np.concatenate([store.moe(0, x[i : i + 1], ids[i : i + 1], weights[i : i + 1]) for i in range(t)])
        assert_same_bits(store.moe(0, x, ids, weights), ref, f"{what}: batch (default threshold) vs each token alone")
        for m in (2, 17, t):
            with gemm_rows(nat, 1):
                gemm = store.moe(0, x[:m], ids[:m], weights[:m])
            with gemm_rows(nat, -1):
                gemv = store.moe(0, x[:m], ids[:m], weights[:m])
            assert_same_bits(gemm, ref[:m], f"{what}: {m} tokens, forced GEMM vs each alone")
            assert_same_bits(gemv, ref[:m], f"{what}: {m} tokens, GEMV vs each alone")


SIMD_PATHS = (("avx2", "native"), ("avx512", "native"), ("avx512", "emu512"))  # the paths with two decodes


@pytest.mark.parametrize("gemm", [-1, 1], ids=["gemv", "gemm"])
@pytest.mark.parametrize("isa,variant", SIMD_PATHS, ids=["avx2", "avx512", "emu512"])
def test_fp8_decodes_give_the_same_bits(isa, variant, gemm):
    """The exact SIMD kernels' two FP8 decodes (`half`: through IEEE half, never a denormal
    operand; `shift`: f32 bits by shift, x carrying 2^56) compute the same products up to exact
    powers of two: the probe's choice (or JAXMOE_CPU_FP8_DECODE) never changes a result. Uniform
    codes, so the 6 % subnormal codes are in every block; both paths (GEMV, GEMM)."""
    nat = native_for(isa, variant)
    rng = np.random.default_rng(5)
    w = matrix("fp8", 300, 400, nat, rng)
    x = activations(rng, 40, 400)
    out = {}
    try:
        with nat.use_isa(isa), nat.use_precision("exact"), gemm_rows(nat, gemm):
            for name, code in (("half", 0), ("shift", 1)):
                nat.check(nat.lib.jm_set_fp8_decode(code))
                assert nat.lib.jm_fp8_decode() == code
                out[name] = w.linear(x)
    finally:
        nat.lib.jm_set_fp8_decode(-1)  # back to the probe's choice
        w.free()
    assert_same_bits(out["shift"], out["half"], f"{isa} ({variant}): FP8 decode shift vs half")
