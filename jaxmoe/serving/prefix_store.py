"""A persistent, content-addressed store of prefix-cache blocks on disk (issue 16).

    store = PrefixStore(directory, prefix_fingerprint(model_name, dtype, ...), max_bytes=8 << 30)
    store.put(block_hash, {"c_kv": c_kv, "k_pe": k_pe})   # per-block cache contents
    arrays = store.get(block_hash)                        # None when absent or not trustworthy

Each block is one safetensors file `<directory>/<fingerprint>/<hash[:2]>/<hash>.safetensors`
(written by `loading.writer`, read by `loading.safetensors_index`), whose `__metadata__` holds
the format version, the fingerprint, the block hash and, per tensor, its dtype, shape and the
crc32 of its bytes. `get` checks all of them: a truncated or corrupt file, or one written for
another model or block, is warned about (`PrefixStoreWarning`), deleted and reported absent.

`put` writes a temporary file in the block's directory, fsyncs it and renames it into place,
so readers (other threads, other processes sharing the directory) never see a partial file.
Recency is the file's mtime (set on every `get`); the store keeps an index of its fingerprint's
files, built by scanning the directory at construction, and evicts least-recently-used files
until its files total at most `max_bytes` (per fingerprint; other fingerprints' directories
are never touched). Files may vanish at any time (another process evicting them): a missing
file is just absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jaxmoe.loading.safetensors_index import DTYPE_NAMES, CheckpointError, SafetensorsFile
from jaxmoe.loading.writer import write_safetensors

PREFIX_FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 60.0

_HASH_RE = re.compile(r"[0-9a-f]{2,128}")
_FINGERPRINT_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,127}")
_KEY = "jaxmoe.prefix."  # prefix of our __metadata__ keys


class PrefixStoreWarning(RuntimeWarning):
    """A block file that cannot be trusted was skipped (and removed), or the store cannot hold a block."""


class _Corrupt(Exception):
    """A block file that fails verification (the message says why)."""


def prefix_fingerprint(*parts: str) -> str:
    """32 hex chars of sha256 over the model identity `parts` and PREFIX_FORMAT_VERSION."""
    if not all(isinstance(p, str) for p in parts):
        raise TypeError(f"fingerprint parts must be str, got {[type(p).__name__ for p in parts]}")
    text = json.dumps(["jaxmoe-prefix", PREFIX_FORMAT_VERSION, *parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _describe(a: np.ndarray) -> str:
    """`<dtype> <shape> <crc32>` of an array, as stored in the metadata."""
    crc = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return f"{DTYPE_NAMES[a.dtype]} {','.join(map(str, a.shape))} {crc:08x}"


@dataclasses.dataclass
class _Entry:
    size: int
    mtime_ns: int


class PrefixStore:
    """Blocks of one model (`fingerprint`) under `directory`, at most `max_bytes` of files (see module doc)."""

    def __init__(self, directory: str | Path, fingerprint: str, max_bytes: int = 8 << 30):
        if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint):
            raise ValueError(f"fingerprint must match {_FINGERPRINT_RE.pattern}, got {fingerprint!r}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.max_bytes = int(max_bytes)
        self.root = self.directory / fingerprint
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._warned_small = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()
        with self._lock:
            self._evict()

    # ---- public API ---------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        """Total size of the block files this store knows of."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, block_hash: str) -> bool:
        path = self._path(block_hash)
        if path.exists():
            return True
        self._forget(block_hash)
        return False

    def get(self, block_hash: str) -> dict[str, np.ndarray] | None:
        """The block's arrays (fresh, writable copies), or None when absent or not trustworthy."""
        path = self._path(block_hash)
        try:
            before = os.stat(path)
            arrays = self._read(path, block_hash)
        except FileNotFoundError:
            self._forget(block_hash)
            return None
        except CheckpointError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # vanished between stat and open
                self._forget(block_hash)
                return None
            self._discard(path, block_hash, before, str(e))
            return None
        except _Corrupt as e:
            self._discard(path, block_hash, before, str(e))
            return None
        except OSError as e:  # unreadable (permissions, I/O error): skip, but leave it alone
            warnings.warn(f"prefix store: cannot read {path}: {e}", PrefixStoreWarning, stacklevel=2)
            return None
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except OSError:
            pass  # evicted meanwhile: the data read is still good
        with self._lock:
            self._record(block_hash, before.st_size, now)  # may be new to us (another process put it)
            self._evict(keep=block_hash)
        return arrays

    def put(self, block_hash: str, arrays: dict[str, np.ndarray]) -> None:
        """Store the block atomically (no-op, apart from marking it used, if already stored), then
        evict least-recently-used files until the store holds at most `max_bytes`."""
        path = self._path(block_hash)
        arrays = self._check_arrays(arrays)
        if self._touch(path, block_hash):
            return
        if sum(a.nbytes for a in arrays.values()) > self.max_bytes:
            self._too_small()
            return
        meta = {_KEY + "format": str(PREFIX_FORMAT_VERSION), _KEY + "fingerprint": self.fingerprint,
                _KEY + "block_hash": block_hash}
        meta.update({f"{_KEY}tensor.{n}": _describe(a) for n, a in arrays.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{block_hash}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        placed = False
        try:
            size = write_safetensors(tmp, arrays, metadata=meta, fsync=True)
            if size > self.max_bytes:
                self._too_small()
                return
            os.replace(tmp, path)
            placed = True
            _fsync_dir(path.parent)
        finally:
            if not placed:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        with self._lock:
            self._record(block_hash, size, time.time_ns())
            self._evict(keep=block_hash)

    # ---- reading and verifying ------------------------------------------------------------------
    def _read(self, path: Path, block_hash: str) -> dict[str, np.ndarray]:
        with SafetensorsFile(path) as f:
            meta = f.metadata
            if not isinstance(meta, dict):
                raise _Corrupt(f"{path}: __metadata__ is not an object")
            want = {_KEY + "format": str(PREFIX_FORMAT_VERSION), _KEY + "fingerprint": self.fingerprint,
                    _KEY + "block_hash": block_hash}
            for key, value in want.items():
                if meta.get(key) != value:
                    raise _Corrupt(f"{path}: metadata {key} is {meta.get(key)!r}, expected {value!r}")
            described = {k[len(_KEY) + 7:]: v for k, v in meta.items() if k.startswith(_KEY + "tensor.")}
            if not described or set(described) != set(f.tensors):
                raise _Corrupt(f"{path}: tensors {sorted(f.tensors)} do not match the metadata's {sorted(described)}")
            out = {}
            for name, desc in described.items():
                view = f.array(name)
                if _describe(view) != desc:
                    raise _Corrupt(f"{path}: tensor {name!r} is {_describe(view)!r}, metadata says {desc!r}")
                out[name] = np.array(view, copy=True)
                del view
            return out

    def _discard(self, path: Path, block_hash: str, before: os.stat_result, why: str) -> None:
        """Warn about an untrustworthy file and delete it, unless it was replaced meanwhile."""
        warnings.warn(f"prefix store: skipping corrupt block file {path} (removed): {why}", PrefixStoreWarning,
                      stacklevel=3)
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (
                    before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns):
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._forget(block_hash)

    # ---- index ----------------------------------------------------------------------------------
    def _path(self, block_hash: str) -> Path:
        if not isinstance(block_hash, str) or not _HASH_RE.fullmatch(block_hash):
            raise ValueError(f"block hash must be 2-128 lowercase hex digits, got {block_hash!r}")
        return self.root / block_hash[:2] / (block_hash + SUFFIX)

    def _check_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not arrays:
            raise ValueError("a block needs at least one array")
        out = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"bad array name {name!r}")
            if a.dtype not in DTYPE_NAMES:
                raise ValueError(f"array {name!r}: dtype {a.dtype} cannot be stored (safetensors dtypes only)")
            out[name] = a
        return out

    def _touch(self, path: Path, block_hash: str) -> bool:
        """Mark a stored block as just used; False if it is not stored."""
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
            size = os.stat(path).st_size
        except FileNotFoundError:
            self._forget(block_hash)
            return False
        with self._lock:
            self._record(block_hash, size, now)
            self._evict(keep=block_hash)
        return True

    def _record(self, block_hash: str, size: int, mtime_ns: int) -> None:
        old = self._index.pop(block_hash, None)
        self._bytes += size - (old.size if old else 0)
        self._index[block_hash] = _Entry(size, mtime_ns)

    def _forget(self, block_hash: str) -> None:
        with self._lock:
            old = self._index.pop(block_hash, None)
            if old is not None:
                self._bytes -= old.size

    def _evict(self, keep: str | None = None) -> None:
        """Delete least-recently-used files until at most max_bytes remain (lock held). A file another
        process used since we last looked (newer mtime) gets its recency refreshed once instead."""
        refreshed: set[str] = set()
        while self._bytes > self.max_bytes and self._index:
            block_hash, entry = next(iter(self._index.items()))
            if block_hash == keep:
                self._index.move_to_end(block_hash)
                if len(self._index) == 1:
                    break
                continue
            path = self.root / block_hash[:2] / (block_hash + SUFFIX)
            try:
                st = os.stat(path)
                if st.st_mtime_ns > entry.mtime_ns and block_hash not in refreshed:
                    refreshed.add(block_hash)
                    self._record(block_hash, st.st_size, st.st_mtime_ns)
                    self._resort()
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass
            del self._index[block_hash]
            self._bytes -= entry.size

    def _resort(self) -> None:
        self._index = OrderedDict(sorted(self._index.items(), key=lambda kv: kv[1].mtime_ns))

    def _scan(self) -> None:
        """Index this fingerprint's block files; remove temporary files older than STALE_TMP_SECONDS."""
        stale_before = time.time_ns() - int(STALE_TMP_SECONDS * 1e9)
        found: dict[str, _Entry] = {}
        for sub in _listdir(self.root):
            if len(sub) != 2 or not (self.root / sub).is_dir():
                continue
            for name in _listdir(self.root / sub):
                path = self.root / sub / name
                try:
                    if name.startswith(".") and name.endswith(TMP_SUFFIX):
                        if os.stat(path).st_mtime_ns < stale_before:
                            os.unlink(path)
                        continue
                    block_hash = name[: -len(SUFFIX)]
                    if name.endswith(SUFFIX) and _HASH_RE.fullmatch(block_hash) and block_hash[:2] == sub:
                        st = os.stat(path)
                        found[block_hash] = _Entry(st.st_size, st.st_mtime_ns)
                except FileNotFoundError:
                    continue  # removed by another process meanwhile
        with self._lock:
            self._index = OrderedDict(sorted(found.items(), key=lambda kv: kv[1].mtime_ns))
            self._bytes = sum(e.size for e in found.values())

    def _too_small(self) -> None:
        if not self._warned_small:
            self._warned_small = True
            warnings.warn(f"prefix store {self.root}: max_bytes={self.max_bytes} is smaller than one block; "
                          "storing nothing", PrefixStoreWarning, stacklevel=3)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
