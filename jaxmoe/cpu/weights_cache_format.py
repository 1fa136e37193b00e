"""The weights cache on disk: one directory per key, how it is written, checked, listed and removed.

This module knows files, not kernels: weights_cache.py decides the key and what goes into
data.bin (and maps it back); `jaxmoe cache` (cli.py) lists, verifies and removes through here.

On disk (`<root>/<key>/`, default root: `jaxmoe.config.cache_dir() / "weights"`):
  data.bin       every packed range at a 4 KiB-aligned offset: a projection's slab (all experts,
                 `slot_bytes` apart, as jm_store_slab shows it), a matrix's tile stream (INT4
                 experts, host matrices), FP8 block scales (float32);
  manifest.json  the key and what it covers, PACK_FORMAT_VERSION, data.bin's size, a crc32 per
                 CHUNK bytes of data.bin, and the entries (offsets, shapes, formats); written last.
The directory is built as `.tmp-<key>-*`, fsync'ed and renamed into place under an exclusive
lock (`<key>.lock`, flock), so a reader sees a whole cache or none; readers hold a shared lock
while they validate and map. A process that finds a cache being written waits for the writer.

Trust: a manifest that does not parse, names another key or version, or whose data.bin has
another size is rejected (warning, rebuilt). `verify` ($JAXMOE_WEIGHTS_CACHE_VERIFY for jaxmoe.load):
"size" (only that), "sample" (default: also the crc32 of the first, the last and two more
chunks: catches a foreign or rewritten file at the cost of reading 64 MiB) or "full" (every
chunk, i.e. reading the whole cache once; `jaxmoe cache verify`): a flipped byte in a chunk
that "sample" does not read goes unnoticed until a full verify. Sizes of every entry are checked again by the native adopt calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

# The packed format of the cache's files. Bump when any of these changes: the tile layout of
# pack.c or int4.c (tile rows, segment bytes, K padding, INT4 superblocks), slot rounding of
# store.c's slabs, the FP8 block-scale layout, or data.bin / manifest.json's structure here.
PACK_FORMAT_VERSION = 1
CHUNK = 16 << 20  # bytes per crc32 in the manifest
ALIGN = 4096
VERIFY_MODES = ("size", "sample", "full")


class CacheError(Exception):
    """A cache that is missing, stale, truncated or foreign (never trusted)."""


def default_root() -> Path:
    from jaxmoe.config import cache_dir  # noqa: PLC0415

    return cache_dir() / "weights"


def root_or_default(root: Path | None) -> Path:
    return Path(root) if root is not None else default_root()


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# ---- locking -------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(root: Path, key: str, exclusive: bool):
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- reading -------------------------------------------------------------------------------
def read_manifest(d: Path) -> dict:
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"no readable manifest in {d}: {e}") from e
    if not isinstance(m, dict) or m.get("format_version") != PACK_FORMAT_VERSION:
        raise CacheError(f"{d} was written for packed format {m.get('format_version') if isinstance(m, dict) else '?'}, "
                         f"this jaxmoe packs format {PACK_FORMAT_VERSION}")
    if m.get("key") != d.name:
        raise CacheError(f"{d}'s manifest names key {m.get('key')!r}")
    return m


def verify_dir(d: Path, verify: str = "sample", key: str | None = None) -> dict:
    """The manifest of a cache directory, checked as `verify` says; CacheError if it is not sound."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    m = read_manifest(d)
    if key is not None and m["key"] != key:
        raise CacheError(f"{d} holds key {m['key']}, expected {key}")
    data = d / "data.bin"
    try:
        size = data.stat().st_size
    except OSError as e:
        raise CacheError(f"{data} is missing") from e
    if size != m["data_bytes"]:
        raise CacheError(f"{data} has {size} bytes, the manifest says {m['data_bytes']} (truncated?)")
    crcs = m["chunk_crc32"]
    if len(crcs) != -(-size // CHUNK):
        raise CacheError(f"{d}'s manifest lists {len(crcs)} checksums for {size} bytes")
    if verify != "size" and crcs:
        idx = range(len(crcs)) if verify == "full" else sorted({0, len(crcs) - 1, len(crcs) // 3, 2 * len(crcs) // 3})
        with open(data, "rb") as f:
            for i in idx:
                f.seek(i * CHUNK)
                if zlib.crc32(f.read(CHUNK)) != crcs[i]:
                    raise CacheError(f"{data}: checksum mismatch in bytes [{i * CHUNK}, {(i + 1) * CHUNK})")
    return m


# ---- writing -------------------------------------------------------------------------------
class DataWriter:
    """data.bin as it is written: ALIGN-aligned ranges and a crc32 per CHUNK bytes."""

    def __init__(self, f, cancel=None):
        self.f, self.pos, self.crcs, self.crc, self.in_chunk = f, 0, [], 0, 0
        self.cancel = cancel  # a threading.Event: set, the next chunk raises CacheError

    def _write(self, b) -> None:
        mv = memoryview(b).cast("B")
        while len(mv):
            if self.cancel is not None and self.cancel.is_set():
                raise CacheError("the write was cancelled")
            take = min(len(mv), CHUNK - self.in_chunk)
            self.f.write(mv[:take])
            self.crc = zlib.crc32(mv[:take], self.crc)
            self.in_chunk += take
            self.pos += take
            mv = mv[take:]
            if self.in_chunk == CHUNK:
                self.crcs.append(self.crc)
                self.crc, self.in_chunk = 0, 0

    def put(self, b) -> int:
        """Writes b at the next ALIGN boundary; returns its offset."""
        pad = -self.pos % ALIGN
        if pad:
            self._write(bytes(pad))
        off = self.pos
        self._write(b)
        return off

    def finish(self) -> list[int]:
        if self.in_chunk:
            self.crcs.append(self.crc)
        return self.crcs


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(root: Path, key: str) -> None:
    """Removes the temp dirs of `key` left by a writer that died; call it holding the exclusive lock
    (only the lock holder writes)."""
    for old in root.glob(f".tmp-{key}-*"):
        shutil.rmtree(old, ignore_errors=True)


def write_dir(root: Path, key: str, fields: dict, source: Path | None,
              fill: Callable[[DataWriter], dict], cancel=None) -> Path:
    """Writes `<root>/<key>/` atomically, replacing what is there: data.bin through fill(writer)
    -> the entries, then the manifest (fields: what the key covers; source: the checkpoint).
    The caller holds the exclusive lock. cancel: a threading.Event that stops the write (CacheError,
    nothing left behind)."""
    d = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / "data.bin", "wb") as f:
            w = DataWriter(f, cancel)
            contents = fill(w)
            crcs = w.finish()
            _fsync(f)
        manifest = {"format_version": PACK_FORMAT_VERSION, "key": key, "key_fields": fields,
                    "created": time.time(),
                    "checkpoint_path": str(source) if source else None, "data_bytes": w.pos, "chunk_bytes": CHUNK,
                    "chunk_crc32": crcs,
                    **contents}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f)
            _fsync(f)
        _fsync_dir(tmp)
        if d.exists():  # unsound (checked by the caller): out of the way first
            trash = root / f".tmp-{key}-old-{uuid.uuid4().hex[:8]}"
            d.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(d)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


# ---- listing and removing (jaxmoe cache) ---------------------------------------------------
def list_caches(root: Path | None = None) -> list[dict]:
    root = root_or_default(root)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        row = {"key": d.name, "path": str(d), "bytes": sum(p.stat().st_size for p in d.iterdir() if p.is_file())}
        try:
            m = read_manifest(d)
            ck = m["key_fields"]["checkpoint"]
            row.update(ok=True, created=m.get("created"), checkpoint=m.get("checkpoint_path"),
                       files=[c["name"] for c in ck])
        except (CacheError, KeyError, TypeError) as e:
            row.update(ok=False, error=str(e))
        out.append(row)
    return out


def remove_dir(root: Path, key: str, *, ignore_errors: bool = False) -> None:
    """Removes `<root>/<key>/` under the exclusive lock. The lock file stays: unlinking it could
    let two writers lock two files."""
    with locked(root, key, exclusive=True):
        shutil.rmtree(root / key, ignore_errors=ignore_errors)


def remove_cache(key: str, root: Path | None = None) -> bool:
    root = root_or_default(root)
    if not key or "/" in key or key.startswith(".") or not (root / key).is_dir():
        return False
    remove_dir(root, key)
    return True
