"""Packing on the native thread pool (pack.c jm_matrix_fill_pool, int4.c, jm_store_pack) writes
the same bytes as a one-thread packing and as a plain numpy model of the layout, for FP8, BF16
and INT4 at shapes whose rows are not a multiple of the 4-row tiles and whose columns are not
of 128, small enough to run on the caller alone and large enough to be split into tasks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxmoe import quant
from jaxmoe.cpu._lib import load
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.host_matrix import HostMatrix

SHAPES = [(1, 1), (13, 200), (130, 385), (517, 1000), (1031, 2177)]  # the last two run as several tasks
THREADS = (1, 2, 5)


def _ref_tiles(rows: np.ndarray, n: int, k_pad_bytes: int) -> np.ndarray:
    """The streaming layout (pack.c): tile t = rows 4t..4t+3, 64-byte segments interleaved."""
    n_tiles = -(-n // 4)
    padded = np.zeros((n_tiles * 4, k_pad_bytes), np.uint8)
    padded[:n, : rows.shape[1]] = rows
    return padded.reshape(n_tiles, 4, k_pad_bytes // 64, 64).transpose(0, 2, 1, 3).reshape(-1)


def _packed(m: HostMatrix) -> tuple[bytes, np.ndarray | None]:
    nat = m._nat
    if not hasattr(nat.lib, "jm_matrix_packed"):
        pytest.skip("this build has no jm_matrix_packed")
    d, nb, sc, nsc, grp = (nat.ffi.new("const uint8_t **"), nat.ffi.new("int64_t *"), nat.ffi.new("const float **"),
                           nat.ffi.new("int64_t *"), nat.ffi.new("int32_t *"))
    nat.check(nat.lib.jm_matrix_packed(m._ptr, d, nb, sc, nsc, grp))
    data = bytes(nat.ffi.buffer(d[0], nb[0]))
    scale = None if sc[0] == nat.ffi.NULL else np.frombuffer(nat.ffi.buffer(sc[0], 4 * nsc[0]), np.float32).copy()
    return data, scale


def _fp8(rng, n, k):
    q, s = quant.quantize_fp8_blocks(rng.standard_normal((n, k)).astype(np.float32))
    return np.asarray(q), np.asarray(s, np.float32)


@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_and_bf16_matrices_pack_the_same_bytes_on_any_thread_count(n, k):
    nat = load()
    rng = np.random.default_rng(n * 7919 + k)
    q, s = _fp8(rng, n, k)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    k_pad = -(-k // 128) * 128
    ref_fp8 = _ref_tiles(q.view(np.uint8), n, k_pad).tobytes()
    ref_bf16 = _ref_tiles(w.view(np.uint8), n, 2 * k_pad).tobytes()
    for threads in THREADS:
        with nat.use_threads(threads):
            a, b = HostMatrix.fp8(q, s), HostMatrix.bf16(w)
        try:
            data, scale = _packed(a)
            assert data == ref_fp8, f"FP8 [{n}, {k}] on {threads} threads"
            np.testing.assert_array_equal(scale, s.reshape(-1))
            assert _packed(b)[0] == ref_bf16, f"BF16 [{n}, {k}] on {threads} threads"
        finally:
            a.free()
            b.free()


def test_strided_sources_pack_like_contiguous_ones():
    nat = load()
    rng = np.random.default_rng(3)
    big = rng.standard_normal((300, 900)).astype(ml_dtypes.bfloat16)
    view = big[:, 11:811]  # rows 900 elements apart
    with nat.use_threads(3):
        a, b = HostMatrix.bf16(view), HostMatrix.bf16(np.ascontiguousarray(view))
    try:
        assert _packed(a)[0] == _packed(b)[0] == _ref_tiles(np.ascontiguousarray(view).view(np.uint8), 300, 2 * 896).tobytes()
    finally:
        a.free()
        b.free()


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_store_slabs_pack_the_same_bytes_on_any_thread_count(fmt):
    nat = load()
    rng = np.random.default_rng(5)
    E, H, INTER = 3, 1000, 517
    shapes = [(INTER, H), (INTER, H), (H, INTER)]
    srcs = []
    for _ in range(E):
        if fmt == "fp8":
            srcs.append([_fp8(rng, n, k) for n, k in shapes])
        else:
            srcs.append([(rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16), None) for n, k in shapes])
    slabs = {}
    for threads in THREADS:
        with nat.use_threads(threads), ExpertStore(2) as store:
            store.init_layer(1, E, H, INTER)
            for e in range(E):
                for j, (w, s) in enumerate(srcs[e]):
                    store.pack(1, e, j, w, s)
            slabs[threads] = [(data.copy(), None if sc is None else sc.copy(), packed)
                              for data, sc, packed in (store.slab(1, j) for j in range(3))]
    for j, (n, k) in enumerate(shapes):
        elem = 1 if fmt == "fp8" else 2
        for e in range(E):
            w, s = srcs[e][j]
            ref = _ref_tiles(w.view(np.uint8), n, elem * (-(-k // 128) * 128))
            for threads, per in slabs.items():
                data, sc, packed = per[j]
                assert packed == ref.size and bytes(data[e, :packed]) == ref.tobytes(), (fmt, j, e, threads)
                if s is not None:
                    np.testing.assert_array_equal(sc[e], s)


def _int4_ref(q: np.ndarray, scales: np.ndarray, n: int, k: int, group: int) -> bytes:
    """int4.c's layout: per tile, per super-block of 8 groups, 4 rows x 4*group nibble bytes
    (byte 32v + 4l + j of a row = columns c and c + 4, c = (8 sb + l) group + 8v + j, low and high
    nibble), then 4 rows x 8 f16 scales; padding nibbles 8, padding rows' scales 0x8888."""
    sbc = 8 * group
    k_pad = -(-k // sbc) * sbc
    n_sb, V, ng = k_pad // sbc, group // 8, -(-k // group)
    n_tiles = -(-n // 4)
    u = np.full((n_tiles * 4, k_pad), 8, np.uint8)
    nib = np.stack([q & 15, q >> 4], axis=-1).reshape(n, -1)[:, :k]
    u[:n, :k] = nib
    b = u.reshape(n_tiles * 4, n_sb, 8, V, 2, 4)
    b = (b[..., 0, :] | (b[..., 1, :] << 4)).transpose(0, 1, 3, 2, 4).reshape(n_tiles, 4, n_sb, 4 * group)
    sc = np.full((n_tiles * 4, n_sb * 8), 0x8888, np.uint16)
    sc[:n] = 0
    sc[:n, :ng] = scales.view(np.uint16)
    sc = sc.reshape(n_tiles, 4, n_sb, 8)
    out = np.concatenate([b.transpose(0, 2, 1, 3).reshape(n_tiles, n_sb, -1),
                          sc.transpose(0, 2, 1, 3).reshape(n_tiles, n_sb, -1).view(np.uint8)], axis=2)
    return out.tobytes()


@pytest.mark.parametrize("n,k,group", [(1, 1, 32), (13, 200, 32), (130, 385, 64), (517, 1000, 128), (1031, 2177, 32)])
def test_int4_matrices_pack_the_same_bytes_on_any_thread_count(n, k, group):
    nat = load()
    rng = np.random.default_rng(n + k + group)
    q = rng.integers(0, 256, (n, -(-k // 2)), dtype=np.uint8)
    s = rng.standard_normal((n, -(-k // group))).astype(np.float16)
    ref = _int4_ref(q, s, n, k, group)
    for threads in THREADS:
        with nat.use_threads(threads):
            m = HostMatrix.int4(q, s, k, group)
        try:
            assert _packed(m)[0] == ref, f"INT4 [{n}, {k}] group {group} on {threads} threads"
        finally:
            m.free()
