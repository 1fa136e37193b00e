"""The on-disk prefix store: round trips, restarts, fingerprints, corruption, LRU eviction, atomicity, threads."""

import hashlib
import os
import struct
import threading
import time
import warnings
import zlib

import ml_dtypes
import numpy as np
import pytest

from jaxmoe.serving import prefix_store
from jaxmoe.serving.prefix_store import PREFIX_FORMAT_VERSION, PrefixStore, PrefixStoreWarning, prefix_fingerprint

FP = prefix_fingerprint("tiny", "bf16")
L = 3


def h(i) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def block(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"c_kv": rng.standard_normal((L, 64, 32)).astype(dtype), "k_pe": rng.standard_normal((L, 64, 8)).astype(dtype)}


def same(a: dict, b: dict) -> bool:
    """Bit-exact equality of two blocks (dtype, shape and bytes)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def path_of(store: PrefixStore, block_hash: str):
    return store.root / block_hash[:2] / f"{block_hash}.safetensors"


def temps(directory) -> list:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def file_size(tmp_path) -> int:
    s = PrefixStore(tmp_path / "probe", FP)
    s.put(h("probe"), block(0))
    return s.bytes_used


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_round_trip_exact(tmp_path, dtype):
    store = PrefixStore(tmp_path, FP)
    b = block(1, dtype)
    b["c_kv"][0, 0, :4] = np.array([np.nan, np.inf, -0.0, 1e-3]).astype(dtype)
    assert h(1) not in store and store.get(h(1)) is None
    store.put(h(1), b)
    assert h(1) in store and len(store) == 1
    assert path_of(store, h(1)).is_file()
    assert store.bytes_used == path_of(store, h(1)).stat().st_size
    got = store.get(h(1))
    assert same(got, b)
    got["c_kv"][0] = 0  # fresh, writable copies: the store's file is untouched
    assert same(store.get(h(1)), b)


def test_standard_container(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    store = PrefixStore(tmp_path, FP)
    b = block(2)
    store.put(h(2), b)
    loaded = safetensors_numpy.load_file(str(path_of(store, h(2))))
    assert same(loaded, b)


def test_put_present_is_noop(tmp_path):
    store = PrefixStore(tmp_path, FP)
    store.put(h(3), block(3))
    ino = path_of(store, h(3)).stat().st_ino
    store.put(h(3), block(4))
    assert path_of(store, h(3)).stat().st_ino == ino
    assert same(store.get(h(3)), block(3))


def test_restart_sees_blocks(tmp_path):
    store = PrefixStore(tmp_path, FP)
    for i in range(3):
        store.put(h(i), block(i, ml_dtypes.bfloat16))
    again = PrefixStore(tmp_path, FP)
    assert len(again) == 3 and again.bytes_used == store.bytes_used
    for i in range(3):
        assert h(i) in again and same(again.get(h(i)), block(i, ml_dtypes.bfloat16))


def test_other_fingerprint_sees_nothing(tmp_path):
    a = PrefixStore(tmp_path, FP)
    a.put(h(1), block(1))
    b = PrefixStore(tmp_path, prefix_fingerprint("tiny", "f32"))
    assert len(b) == 0 and b.bytes_used == 0 and h(1) not in b and b.get(h(1)) is None
    b.put(h(1), block(2))
    assert same(a.get(h(1)), block(1)) and same(b.get(h(1)), block(2))


def test_prefix_fingerprint(monkeypatch):
    fp = prefix_fingerprint("deepseek-v3", "fp8")
    assert len(fp) == 32 and int(fp, 16) >= 0 and fp == prefix_fingerprint("deepseek-v3", "fp8")
    assert fp != prefix_fingerprint("deepseek-v3", "int4")
    assert prefix_fingerprint("ab", "c") != prefix_fingerprint("a", "bc")
    monkeypatch.setattr(prefix_store, "PREFIX_FORMAT_VERSION", PREFIX_FORMAT_VERSION + 1)
    assert prefix_fingerprint("deepseek-v3", "fp8") != fp
    with pytest.raises(TypeError):
        prefix_fingerprint("x", 1)


def test_bad_names_rejected(tmp_path):
    store = PrefixStore(tmp_path, FP)
    for bad in ["../../etc", "", "a", "ABCDEF", h(1) + "/x"]:
        with pytest.raises(ValueError):
            store.get(bad)
    with pytest.raises(ValueError):
        PrefixStore(tmp_path, "../up")
    with pytest.raises(ValueError):
        store.put(h(1), {"x": np.zeros(3, dtype=object)})
    with pytest.raises(ValueError):
        store.put(h(1), {})
    assert store.bytes_used == 0 and not temps(tmp_path)


# ---- corruption -----------------------------------------------------------------------------------
def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def corrupt_truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])


def corrupt_data_byte(p):
    data = bytearray(p.read_bytes())
    data[(header_end(data) + len(data)) // 2] ^= 0x10
    p.write_bytes(bytes(data))


def corrupt_last_byte(p):
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


def replacing(old: bytes, new: bytes):
    def corrupt(p):
        data = p.read_bytes()
        assert len(old) == len(new) and data[: header_end(data)].count(old) >= 1
        p.write_bytes(data.replace(old, new, 1))
    return corrupt


KPE_CRC = f"{zlib.crc32(block(1)['k_pe'].tobytes()):08x}"
CORRUPTIONS = {
    "truncated": corrupt_truncate,
    "empty": lambda p: p.write_bytes(b""),
    "data byte": corrupt_data_byte,
    "last byte": corrupt_last_byte,
    "header dtype F32->I32": replacing(b'"F32"', b'"I32"'),
    "header tensor name": replacing(b'"k_pe"', b'"k_pf"'),
    "header json": replacing(b'{"', b'["'),
    "header length": lambda p: p.write_bytes(b"\xff" + p.read_bytes()[1:]),
    "metadata shape": replacing(b'"F32 3,64,8 ', b'"F32 3,64,9 '),
    "metadata crc": lambda p: replacing(KPE_CRC.encode(), KPE_CRC[::-1].encode())(p),
    "metadata format": replacing(f'"{PREFIX_FORMAT_VERSION}"'.encode(), f'"{PREFIX_FORMAT_VERSION + 1}"'.encode()),
    "metadata fingerprint": replacing(FP.encode(), FP[::-1].encode()),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_file_skipped_and_removed(tmp_path, kind):
    store = PrefixStore(tmp_path, FP)
    store.put(h(1), block(1))
    store.put(h(2), block(2))
    p = path_of(store, h(1))
    CORRUPTIONS[kind](p)
    with pytest.warns(PrefixStoreWarning, match=p.name):
        assert store.get(h(1)) is None
    assert not p.exists() and h(1) not in store
    assert store.bytes_used == path_of(store, h(2)).stat().st_size
    assert same(store.get(h(2)), block(2))


def test_wrong_hash_in_metadata(tmp_path):
    store = PrefixStore(tmp_path, FP)
    store.put(h(1), block(1))
    p = path_of(store, h(2))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(path_of(store, h(1)).read_bytes())  # block 1's file under block 2's name
    assert h(2) in PrefixStore(tmp_path, FP)
    with pytest.warns(PrefixStoreWarning, match=p.name):
        assert store.get(h(2)) is None
    assert not p.exists() and same(store.get(h(1)), block(1))


def test_wrong_fingerprint_file(tmp_path):
    other = PrefixStore(tmp_path, prefix_fingerprint("other"))
    other.put(h(1), block(1))
    store = PrefixStore(tmp_path, FP)
    p = path_of(store, h(1))
    p.parent.mkdir(parents=True)
    p.write_bytes(path_of(other, h(1)).read_bytes())
    with pytest.warns(PrefixStoreWarning, match=p.name):
        assert store.get(h(1)) is None
    assert not p.exists() and same(other.get(h(1)), block(1))


def test_every_header_byte_flip_is_caught_or_harmless(tmp_path):
    """Flipping any one bit of the header never makes get return different data."""
    store = PrefixStore(tmp_path, FP)
    b = block(5, ml_dtypes.bfloat16)
    store.put(h(5), b)
    p = path_of(store, h(5))
    good = p.read_bytes()
    caught = 0
    for i in range(header_end(good)):
        for bit in (0x01, 0x40):
            data = bytearray(good)
            data[i] ^= bit
            p.write_bytes(bytes(data))
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = store.get(h(5))
            if got is None:
                assert w and not p.exists()
                caught += 1
            else:
                assert same(got, b) and not w
    assert caught > header_end(good)  # nearly every flip is caught


# ---- eviction -------------------------------------------------------------------------------------
def test_lru_eviction(tmp_path):
    size = file_size(tmp_path)
    store = PrefixStore(tmp_path / "s", FP, max_bytes=3 * size + size // 2)
    for i in range(3):
        store.put(h(i), block(i))
    assert store.get(h(0)) is not None  # 0 is now the most recently used, 1 the least
    store.put(h(3), block(3))
    assert h(1) not in store and not path_of(store, h(1)).exists()
    assert all(h(i) in store for i in (0, 2, 3))
    store.put(h(4), block(4))
    assert h(2) not in store and all(h(i) in store for i in (0, 3, 4))
    on_disk = sum(p.stat().st_size for p in store.root.rglob("*.safetensors"))
    assert store.bytes_used == on_disk == 3 * size <= store.max_bytes


def test_restart_evicts_oldest_by_mtime(tmp_path):
    size = file_size(tmp_path)
    store = PrefixStore(tmp_path / "s", FP)
    now = time.time_ns()
    for i, age in enumerate([30, 10, 20, 40]):  # seconds since last use
        store.put(h(i), block(i))
        os.utime(path_of(store, h(i)), ns=(now - age * 10**9,) * 2)
    small = PrefixStore(tmp_path / "s", FP, max_bytes=2 * size)
    assert sorted(i for i in range(4) if h(i) in small) == [1, 2]
    assert small.bytes_used == 2 * size


def test_use_by_another_process_counts(tmp_path):
    """A block another store (process) read since this one indexed it is not evicted first."""
    size = file_size(tmp_path)
    mine = PrefixStore(tmp_path / "s", FP, max_bytes=2 * size)
    mine.put(h(0), block(0))
    mine.put(h(1), block(1))
    time.sleep(0.01)
    assert PrefixStore(tmp_path / "s", FP, max_bytes=2 * size).get(h(0)) is not None
    mine.put(h(2), block(2))
    assert h(0) in mine and h(1) not in mine and h(2) in mine


def test_vanished_file_is_just_absent(tmp_path):
    store = PrefixStore(tmp_path, FP)
    store.put(h(1), block(1))
    path_of(store, h(1)).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.get(h(1)) is None
    assert store.bytes_used == 0 and len(store) == 0


def test_max_bytes_below_one_block(tmp_path):
    store = PrefixStore(tmp_path, FP, max_bytes=1000)
    with pytest.warns(PrefixStoreWarning, match="smaller than one block") as w:
        store.put(h(1), block(1))
        store.put(h(2), block(2))
    assert len(w) == 1
    assert store.bytes_used == 0 and h(1) not in store and not list(tmp_path.rglob("*.*"))
    data_only = sum(a.nbytes for a in block(1).values())  # data fits, the header does not
    store = PrefixStore(tmp_path, FP, max_bytes=data_only)
    with pytest.warns(PrefixStoreWarning):
        store.put(h(1), block(1))
    assert store.bytes_used == 0 and not list(tmp_path.rglob("*.*"))


# ---- atomicity, temporaries, threads --------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    real = prefix_store.write_safetensors

    def half_then_crash(file, arrays, **kw):
        real(file, arrays, **kw)
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
        raise exc

    store = PrefixStore(tmp_path, FP)
    monkeypatch.setattr(prefix_store, "write_safetensors", half_then_crash)
    with pytest.raises(type(exc)):
        store.put(h(1), block(1))
    assert not path_of(store, h(1)).exists() and not temps(tmp_path)
    assert h(1) not in store and store.get(h(1)) is None and store.bytes_used == 0
    monkeypatch.undo()
    store.put(h(1), block(1))
    assert same(store.get(h(1)), block(1))


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    store = PrefixStore(tmp_path, FP)

    def fail(*a):
        raise OSError("rename failed")

    monkeypatch.setattr(prefix_store.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        store.put(h(1), block(1))
    monkeypatch.undo()
    assert not temps(tmp_path) and not path_of(store, h(1)).exists() and store.bytes_used == 0


def test_stale_temps_removed_on_start(tmp_path):
    store = PrefixStore(tmp_path, FP)
    store.put(h(1), block(1))
    d = path_of(store, h(1)).parent
    old, fresh = d / f".{h(1)}.1.aa.tmp", d / f".{h(1)}.2.bb.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    os.utime(old, (time.time() - 120,) * 2)
    again = PrefixStore(tmp_path, FP)
    assert not old.exists() and fresh.exists()
    assert len(again) == 1 and again.bytes_used == store.bytes_used


def test_concurrent_puts_same_hash(tmp_path):
    store = PrefixStore(tmp_path, FP)
    b = block(7, ml_dtypes.bfloat16)
    n = 8
    barrier, errors = threading.Barrier(n), []

    def worker():
        try:
            barrier.wait()
            store.put(h(7), b)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not temps(tmp_path)
    assert same(store.get(h(7)), b)
    assert len(store) == 1 and store.bytes_used == path_of(store, h(7)).stat().st_size


def test_threads_churn_with_eviction(tmp_path):
    """Puts and gets of overlapping blocks from several threads (two stores: two "processes") under
    a small limit: no errors, no corruption warnings, every hit exact, the limit held."""
    size = file_size(tmp_path)
    stores = [PrefixStore(tmp_path / "s", FP, max_bytes=4 * size) for _ in range(2)]
    blocks = {i: block(i) for i in range(10)}
    errors = []

    def worker(k):
        rng = np.random.default_rng(k)
        try:
            store = stores[k % 2]
            for _ in range(60):
                i = int(rng.integers(10))
                got = store.get(h(i))
                if got is None:
                    store.put(h(i), blocks[i])
                elif not same(got, blocks[i]):
                    errors.append(f"block {i} differs")
        except BaseException as e:
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrefixStoreWarning)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not temps(tmp_path)
    for s in stores:
        assert s.bytes_used <= s.max_bytes
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*.safetensors"))
    assert on_disk <= 2 * 4 * size
