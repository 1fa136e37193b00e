"""The INT4 GEMM path (prefill: many tokens per weight) on every ISA path.

jm_linear and the fused MoE take it from jm_gemm_min_rows() rows (forced here from 1 row). Its
int8 activations are those of the GEMV path, its integer group dots exact, and its f32
operations (per group lane fma(dot * s_x, s_w, acc) over the super-blocks, then an 8-lane sum)
those of the AVX2 GEMV tile kernel; the scalar twin replays them lane by lane. So:
- vs the float64 references of test_int4_kernels (exact algebra and dequantized weights),
- bit for bit equal to the scalar GEMM twin, and to the AVX2 GEMV path where AVX2 runs,
- the fused MoE on the GEMM path == on the GEMV path (AVX2) bit for bit, and close to the
  float64 emulation and to the JAX reference on the dequantized weights,
- independent of the thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jaxmoe import quant_int4 as Q
from jaxmoe.cpu import _lib
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.host_matrix import HostGroup, HostMatrix
from tests.cpu.test_int4_kernels import check, references
from tests.cpu.test_int4_moe import case
from tests.cpu.test_kernels import gemm_rows

SHAPES = [  # (n, k, group, m): N off the 16-row panel and the 3-row micro-kernel, K off 128
    (37, 200, 32, 24),
    (130, 300, 64, 61),
    (20, 1000, 128, 33),
    (5, 257, 256, 100),
    (50, 1100, 32, 7),
]


def int4_matrix(rng, n, k, group, nat):
    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp(rng.uniform(-2, 2, (n, 1)))
    q, s = Q.quantize_int4(w, group)
    return q, s, HostMatrix.int4(q, s, k, group, native=nat)


def avx2_native():
    nat = _lib.load("native")
    return nat if nat.lib.jm_isa_supported(1) else None


@pytest.mark.parametrize("n,k,group,m", SHAPES)
def test_gemm_vs_reference_and_twins(isa_lib, n, k, group, m):
    isa, nat = isa_lib
    rng = np.random.default_rng(n * 31 + k)
    q, s, hm = int4_matrix(rng, n, k, group, nat)
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (1, k)))).astype(np.float32)
    try:
        with gemm_rows(nat, 1):
            y = hm.linear(x)
            with nat.use_isa("scalar"):
                y_scalar = hm.linear(x)
    finally:
        hm.free()
    exact, be, dense, bd = references(q, s, k, group, x)
    what = f"{isa} int4 gemm [{n},{k}] g{group} m{m}"
    check(y, exact, be, f"{what} vs exact")
    check(y, dense, bd, f"{what} vs dense")
    np.testing.assert_array_equal(y, y_scalar, err_msg=f"{what}: != the scalar GEMM twin")
    native = avx2_native()
    if native is not None:  # the AVX2 GEMV tile kernel does the same f32 operations
        hm2 = HostMatrix.int4(q, s, k, group, native=native)
        try:
            with gemm_rows(native, -1), native.use_isa("avx2"):
                y_gemv = hm2.linear(x)
        finally:
            hm2.free()
        np.testing.assert_array_equal(y, y_gemv, err_msg=f"{what}: != the AVX2 GEMV path")


def test_threshold_bf16_io_and_threads(isa_lib):
    """At the default threshold 70 rows take the GEMM path: same result as forced;
    bf16 in/out; 1 or 3 threads (few panels: tokens split across tasks) give the same bits."""
    isa, nat = isa_lib
    rng = np.random.default_rng(11)
    q, s, hm = int4_matrix(rng, 40, 7168 // 8, 32, nat)
    x = rng.standard_normal((70, 7168 // 8)).astype(np.float32)
    try:
        with gemm_rows(nat, 0):  # the default threshold
            y = hm.linear(x)
            with nat.use_threads(1):
                y1 = hm.linear(x)
            with nat.use_threads(3):
                y3 = hm.linear(x)
            yb = hm.linear(x.astype(ml_dtypes.bfloat16), out_dtype=ml_dtypes.bfloat16)
        with gemm_rows(nat, 1):
            y_forced = hm.linear(x)
    finally:
        hm.free()
    np.testing.assert_array_equal(y, y_forced)
    np.testing.assert_array_equal(y, y1)
    np.testing.assert_array_equal(y, y3)
    _, _, dense_b, bd_b = references(q, s, 7168 // 8, 32, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    check(yb.astype(np.float32), dense_b, bd_b + 2.0**-8 * np.abs(dense_b), f"{isa} bf16 io")


def test_grouped_linear_mixed_group_sizes(isa_lib):
    """jm_linear_grouped over INT4 matrices of one shape but different group sizes (each its
    own activation layout) on the GEMM path == each matrix alone."""
    isa, nat = isa_lib
    rng = np.random.default_rng(5)
    n, k, m = 19, 520, 30
    mats = [int4_matrix(rng, n, k, g, nat) for g in (32, 128, 64)]
    x = rng.standard_normal((m, 3, k)).astype(np.float32)
    with gemm_rows(nat, 1):
        want = [hm.linear(x[:, j]) for j, (_, _, hm) in enumerate(mats)]
        grp = HostGroup([hm for _, _, hm in mats])
        try:
            y = grp.linear(x)
        finally:
            grp.free()
    for j in range(3):
        np.testing.assert_array_equal(y[:, j], want[j], err_msg=f"{isa} group member {j}")


@pytest.mark.parametrize("params", [(4, 96, 40, 5, 2, 32), (3, 300, 200, 17, 2, 64)])
def test_moe_gemm_vs_gemv_and_references(isa_lib, params):
    isa, nat = isa_lib
    experts, ids, weights, x, emu, jax_out = case(*params)
    with ExpertStore(2, native=nat) as store:
        store.add_layer(1, *experts)
        with gemm_rows(nat, 1):
            out = store.moe(1, x, ids, weights)
            with nat.use_threads(1):
                out1 = store.moe(1, x, ids, weights)
            with nat.use_isa("scalar"):
                out_scalar = store.moe(1, x, ids, weights)
            out_b = store.moe(1, x.astype(ml_dtypes.bfloat16), ids, weights, out_dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out, out1, err_msg=f"{isa}: thread count changed the result")
    np.testing.assert_array_equal(out, out_scalar, err_msg=f"{isa}: != the scalar GEMM twin")
    scale = np.abs(out).max() + 1e-30
    assert np.abs(out - emu).max() <= 2e-3 * scale, f"{isa}: vs emulation {np.abs(out - emu).max() / scale:.3g}"
    rel = np.linalg.norm(out - jax_out) / np.linalg.norm(jax_out)
    assert rel < 2e-2, f"{isa}: vs the JAX reference on dequantized INT4 weights, relative L2 {rel:.3g}"
    rel_b = np.linalg.norm(out_b.astype(np.float32) - jax_out) / np.linalg.norm(jax_out)
    assert rel_b < 3e-2, f"{isa}: bf16 io, relative L2 {rel_b:.3g}"
    native = avx2_native()
    if native is not None:  # the GEMV path with the AVX2 kernels: the same bits
        with ExpertStore(2, native=native) as store, gemm_rows(native, -1), native.use_isa("avx2"):
            store.add_layer(1, *experts)
            out_gemv = store.moe(1, x, ids, weights)
        np.testing.assert_array_equal(out, out_gemv, err_msg=f"{isa}: GEMM path != AVX2 GEMV path")


def test_moe_gemm_batches_and_mixed_groups(monkeypatch):
    """A small h budget (one expert per batch) changes nothing; experts of different group
    sizes in one call fall back to the GEMV path (one activation layout per GEMM call)."""
    from tests.cpu.test_int4_moe import make_int4_experts, routing

    nat = _lib.load("native")
    rng = np.random.default_rng(9)
    experts = make_int4_experts(rng, 4, 128, 96, 32)
    ids, weights = routing(rng, 40, 4, 2)
    x = rng.standard_normal((40, 128)).astype(np.float32)
    with ExpertStore(1, native=nat) as store, gemm_rows(nat, 1):
        store.add_layer(0, *experts)
        whole = store.moe(0, x, ids, weights)
        monkeypatch.setenv("JAXMOE_CPU_MOE_BUDGET", str(96 * 4))  # h: one row -> one expert per batch
        np.testing.assert_array_equal(store.moe(0, x, ids, weights), whole)
        monkeypatch.delenv("JAXMOE_CPU_MOE_BUDGET")
        other = make_int4_experts(rng, 1, 128, 96, 64)
        store.set_expert(0, 3, *[HostMatrix.int4(np.asarray(w.qweight)[0], np.asarray(w.scales)[0], w.k, w.group,
                                                 native=nat) for w in other])
        mixed = store.moe(0, x, ids, weights)
        with gemm_rows(nat, -1):
            np.testing.assert_array_equal(mixed, store.moe(0, x, ids, weights))


THRESHOLD_SCRIPT = """
import numpy as np
from jaxmoe.cpu import _lib
from tests.cpu.test_int4_gemm import int4_matrix
from tests.cpu.test_kernels import gemm_rows
nat = _lib.load("native")
counts = nat.ffi.new("int64_t[18]")
_, _, hm = int4_matrix(np.random.default_rng(13), 24, 640, 32, nat)
x = np.ones((16, 640), np.float32)
for min_rows, rows in ((0, 16), (0, 15), (30, 16)):  # default 24: from 16 rows; 30: from 20
    nat.lib.jm_profile_read(counts, 6, 1)
    with gemm_rows(nat, min_rows):
        hm.linear(x[:rows])
    nat.lib.jm_profile_read(counts, 6, 0)
    print(min_rows, rows, int(counts[3 * 0 + 2]), int(counts[3 * 1 + 2]))  # rows: GEMV, GEMM
hm.free()
"""


def test_int4_threshold_is_two_thirds_of_gemm_min():
    """INT4 takes the GEMM path from 2/3 of jm_gemm_min_rows (16 rows at the default 24); the
    native profiler (JAXMOE_CPU_PROFILE, read at load: a fresh process) tells which path ran."""
    env = {**os.environ, "JAXMOE_CPU_PROFILE": "1"}
    out = subprocess.run([sys.executable, "-c", THRESHOLD_SCRIPT], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.split("\n")
    assert out[:3] == ["0 16 0 16", "0 15 15 0", "30 16 16 0"], out
