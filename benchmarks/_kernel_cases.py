"""What the kernel benchmarks measure: DeepSeek-V3 expert shapes, the expert stores and the
native calls timed on them. Shared by benchmarks.kernels, kernels_gemm and kernels_int4.

One MoE layer (layer 0) of N_EXPERTS experts, each gate/up INTER x HIDDEN and down
HIDDEN x INTER, packed into a jaxmoe ExpertStore: as FP8 drawn by benchmarks/_fp8_draws.py
(`build_store`) or as group-32 INT4 with random codes and scales (`build_int4_store`: speed
does not depend on the values). The cases are zero-argument callables over inputs drawn once
(the callables keep them alive, the native calls only see pointers): linears over a list of
matrices (`linear_case`) and the fused MoE layer (`moe_case`, `moe_token_case`), optionally
forced onto the GEMM path or the GEMV token chunks (`with_gemm_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np

from benchmarks import _fp8_draws as D

HIDDEN, INTER, N_EXPERTS = 7168, 2048, 8
SHAPES = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))  # gate, up, down
INT4_GROUP = 32


def build_store(rng, draw: str = "checkpoint_like", n_experts: int = N_EXPERTS):
    """An ExpertStore with one layer of `n_experts` FP8 experts at SHAPES, drawn by
    benchmarks._fp8_draws (`draw`). Returns (store, expert 0's three quant.Fp8Weight for the
    dequantize baselines, the draw's code distribution {"draw", "codes", "subnormal_frac",
    "zero_frac"})."""
    from jaxmoe import quant  # noqa: PLC0415
    from jaxmoe.cpu.expert_store import ExpertStore  # noqa: PLC0415
    from jaxmoe.cpu.host_matrix import HostMatrix  # noqa: PLC0415

    store = ExpertStore(1)
    store.init_layer(0, n_experts, HIDDEN, INTER)
    stats, kept = D.CodeStats(), []
    for e in range(n_experts):
        mats = []
        for n, k in SHAPES:
            q, s = D.draw(draw, rng, n, k)
            stats.add(q)
            mats.append(HostMatrix.fp8(q, s))
            if e == 0:
                kept.append(quant.Fp8Weight(weight=q.view(quant.FP8_DTYPE), weight_scale_inv=s))
        store.set_expert(0, e, *mats)
    return store, kept, {"draw": draw, **stats.as_dict()}


def build_int4_store(rng, n_experts: int = N_EXPERTS):
    """An ExpertStore with one layer of `n_experts` INT4 experts at SHAPES: uniform codes,
    f16 scales ~1e-2 x U(0.5, 2) per group of INT4_GROUP along K."""
    from jaxmoe.cpu.expert_store import ExpertStore  # noqa: PLC0415
    from jaxmoe.cpu.host_matrix import HostMatrix  # noqa: PLC0415

    store = ExpertStore(1)
    store.init_layer(0, n_experts, HIDDEN, INTER)
    for e in range(n_experts):
        mats = []
        for n, k in SHAPES:
            q = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
            s = rng.uniform(0.5, 2.0, size=(n, k // INT4_GROUP)).astype(np.float16) * np.float16(1e-2)
            mats.append(HostMatrix.int4(q, s, k, INT4_GROUP))
        store.set_expert(0, e, *mats)
    return store


def store_mats(lib, store, experts: Iterable[int] = range(N_EXPERTS)) -> list:
    """The native matrix handles of layer 0's `experts`, gate/up/down of each in turn."""
    return [lib.jm_store_matrix(store._ptr, 0, e, j) for e in experts for j in range(len(SHAPES))]


def linear_case(nat, rng, m: int, mats: list, shapes: list) -> Callable[[], None]:
    """`jm_linear` over each matrix of `mats` (shape (N, K) in `shapes`) for m tokens, on
    inputs drawn now (one [m, K] per K) into one output [m, N] per N."""
    ffi, lib = nat.ffi, nat.lib
    xs = {k: rng.standard_normal((m, k)).astype(np.float32) for k in (HIDDEN, INTER)}
    ys = {n: np.empty((m, n), np.float32) for n in (HIDDEN, INTER)}
    calls = [(w, ffi.cast("void *", xs[k].ctypes.data), ffi.cast("void *", ys[n].ctypes.data))
             for w, (n, k) in zip(mats, shapes)]

    def run(_keep=(xs, ys)):  # the casts above do not keep the arrays alive
        for w, xp, yp in calls:
            lib.jm_linear(w, xp, 0, m, yp, 0)
    return run


class MoeCase:
    """Inputs of a fused-MoE call of layer 0 (x [T, HIDDEN], expert ids and weights [T, top_k])
    and an output buffer; calling it with a store gives the zero-argument `jm_moe` call."""

    def __init__(self, nat, x: np.ndarray, ids: np.ndarray, wts: np.ndarray):
        self.nat, self.x, self.ids, self.wts = nat, x, ids, wts
        self.out = np.empty_like(x)

    def __call__(self, store) -> Callable[[], None]:
        c, lib = self.nat.ffi.cast, self.nat.lib
        t, top_k = self.ids.shape
        args = (store._ptr, 0, c("void *", self.x.ctypes.data), 0, t, c("int32_t *", self.ids.ctypes.data),
                c("float *", self.wts.ctypes.data), top_k, c("void *", self.out.ctypes.data), 0)

        def run(_keep=self):
            lib.jm_moe(*args)
        return run


def moe_case(nat, rng, t: int, top_k: int) -> MoeCase:
    """The fused MoE at t tokens, each on top_k distinct experts drawn uniformly."""
    x = rng.standard_normal((t, HIDDEN)).astype(np.float32)
    ids = np.stack([rng.permutation(N_EXPERTS)[:top_k] for _ in range(t)]).astype(np.int32)
    wts = rng.random((t, top_k)).astype(np.float32)
    return MoeCase(nat, x, ids, wts)


def moe_token_case(nat, rng) -> MoeCase:
    """The fused MoE for one token on all N_EXPERTS experts."""
    x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    ids = np.arange(N_EXPERTS, dtype=np.int32)[None]
    wts = rng.random((1, N_EXPERTS)).astype(np.float32)
    return MoeCase(nat, x, ids, wts)


@contextlib.contextmanager
def gemm_rows(lib, m: int):
    """The GEMM-path row threshold (jm_gemm_min_rows) set to m while inside: 1 takes the GEMM
    path always, -1 never (the GEMV token chunks instead); the previous one is restored on exit."""
    prev = lib.jm_set_gemm_min_rows(m)
    try:
        yield
    finally:
        lib.jm_set_gemm_min_rows(prev)


def with_gemm_rows(lib, fn: Callable[[], None], rows: int) -> Callable[[], None]:
    """`fn` run under gemm_rows(lib, rows)."""
    def run():
        with gemm_rows(lib, rows):
            fn()
    return run
