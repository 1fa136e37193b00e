"""Lazy, memory-mapped, validating reader of safetensors checkpoints (one file or sharded).

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the end of the header), then the raw tensor bytes. We parse the header ourselves
(safetensors' numpy API cannot return F8_E4M3) and hand out read-only numpy views of one
`mmap` per file: zero-copy for every dtype, FP8 included (`ml_dtypes.float8_e4m3fn`).

Every structural problem (corrupt header, truncated file, offsets out of range, overlapping
or not matching shape*itemsize, a sharded index naming a missing file or a tensor its shard
lacks, a tensor in two shards) raises `CheckpointError` naming the tensor and the file; all
problems found are reported together (the first `MAX_REPORTED` of each kind).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the limit the reference implementation enforces
MAX_REPORTED = 10

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as is. `problems` lists every problem found."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def collect(cls, title: str, problems: dict[str, list[str]]) -> CheckpointError:
        """One error for many problems, grouped by kind, the first MAX_REPORTED of each shown."""
        lines, flat = [], []
        total = sum(len(v) for v in problems.values())
        for kind, items in problems.items():
            if not items:
                continue
            flat += items
            lines.append(f"  {kind} ({len(items)}):")
            lines += [f"    {p}" for p in items[:MAX_REPORTED]]
            if len(items) > MAX_REPORTED:
                lines.append(f"    ... and {len(items) - MAX_REPORTED} more")
        return cls(f"{title}: {total} problem(s)\n" + "\n".join(lines), flat)


def raise_if(title: str, problems: dict[str, list[str]]) -> None:
    if any(problems.values()):
        raise CheckpointError.collect(title, problems)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors spelling: "F8_E4M3", "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


class SafetensorsFile:
    """One .safetensors file: validated header, one read-only mmap, zero-copy views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._mm: mmap.mmap | None = None
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e}") from e
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{self.path}: corrupt header length {n} (file has {size} bytes): truncated or not safetensors"
                )
            raw = f.read(n)
            self.tensors, self.metadata = _parse_header(raw, self.path, 8 + n, size)
            if size > 0:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def array(self, name: str) -> np.ndarray:
        """Read-only zero-copy view of a tensor (KeyError if absent)."""
        return self.view(self.tensors[name])

    def view(self, t: TensorInfo) -> np.ndarray:
        if self._mm is None or self._mm.closed:
            raise CheckpointError(f"{self.path}: file is closed (reading {t.name})")
        count = math.prod(t.shape)
        if count == 0:
            return np.empty(t.shape, t.np_dtype)
        a = np.frombuffer(self._mm, dtype=t.np_dtype, count=count, offset=t.start)
        return a.reshape(t.shape)

    def close(self) -> None:
        """Unmap. While views handed out are still alive the mapping stays until they die."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported views keep it alive; the OS unmaps when the last one goes

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_header(raw: bytes, path: Path, data_start: int, size: int) -> tuple[dict[str, TensorInfo], dict]:
    dups: list[str] = []

    def no_dups(pairs: list) -> dict:
        seen: set = set()
        dups.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dups)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    problems: dict[str, list[str]] = {"corrupt entry": [], "truncated": [], "overlapping": [],
                                      "duplicate": [f"tensor {k!r} listed twice in {path}" for k in dups]}
    tensors: dict[str, TensorInfo] = {}
    for name, e in header.items():
        where = f"tensor {name!r} in {path}"
        try:
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            problems["corrupt entry"].append(f"{where}: malformed entry {e!r}")
            continue
        if dtype not in DTYPES:
            problems["corrupt entry"].append(f"{where}: unknown dtype {dtype!r}")
            continue
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != want:
            problems["corrupt entry"].append(
                f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                f"shape {shape} x {dtype} needs {want}"
            )
            continue
        if data_start + end > size:
            problems["truncated"].append(
                f"{where}: needs bytes up to {data_start + end}, file has {size} (truncated file?)"
            )
            continue
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            problems["overlapping"].append(f"tensors {n0!r} and {n1!r} in {path} overlap")
    raise_if(f"corrupt safetensors file {path}", problems)
    return tensors, metadata


class SafetensorsCheckpoint:
    """All the safetensors files of a checkpoint behind one name -> tensor map.

    `path` is a directory (with `model.safetensors.index.json`, or one/many `*.safetensors`)
    or a single .safetensors file. Opening validates every header and the index; tensor data
    is only touched when a view is read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files: dict[Path, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index = self.path / INDEX_NAME if self.path.is_dir() else None
        weight_map: dict[str, str] | None = None
        if self.path.is_file():
            paths = [self.path]
        elif index is not None and index.exists():
            weight_map = _read_index(index)
            paths = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [p for p in paths if not p.exists()]
            if missing:
                names = {p: sorted(n for n, f in weight_map.items() if self.path / f == p) for p in missing}
                raise CheckpointError.collect(
                    f"checkpoint {self.path}",
                    {f"shard named in {index} missing": [
                        f"{p} (holds {len(v)} tensors, e.g. {v[0]!r})" for p, v in names.items()]},
                )
        elif self.path.is_dir():
            paths = sorted(self.path.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"checkpoint {self.path}: no *.safetensors files and no {INDEX_NAME}")
        else:
            raise CheckpointError(f"checkpoint {self.path} does not exist")
        errors: list[CheckpointError] = []
        for p in paths:
            try:
                self.files[p] = SafetensorsFile(p)
            except CheckpointError as e:
                errors.append(e)
        if errors:
            probs = [p for e in errors for p in e.problems]
            raise CheckpointError.collect(f"checkpoint {self.path}", {"corrupt or truncated file": probs})
        problems: dict[str, list[str]] = {"duplicate": [], "listed in index but not in its shard": [],
                                          "in a shard but not listed in index": []}
        dups = set()
        for f in self.files.values():
            for name, t in f.tensors.items():
                if name in self.tensors:
                    problems["duplicate"].append(f"{name!r} in both {self.tensors[name].file} and {t.file}")
                    dups.add(name)
                else:
                    self.tensors[name] = t
        if weight_map is not None:
            for name, fname in weight_map.items():
                t = self.tensors.get(name)
                if name not in dups and (t is None or t.file != self.path / fname):
                    problems["listed in index but not in its shard"].append(f"{name!r} -> {self.path / fname}")
            for name, t in self.tensors.items():
                if name not in weight_map:
                    problems["in a shard but not listed in index"].append(f"{name!r} in {t.file}")
        raise_if(f"checkpoint {self.path}", problems)

    # ---- access -----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        """Read-only zero-copy view of the named tensor (KeyError if absent)."""
        t = self.tensors[name]
        return self.files[t.file].view(t)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_index(index: Path) -> dict[str, str]:
    try:
        d = json.loads(index.read_text())
        wm = d["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt index {index}: {e}") from e
    bad = [f for f in set(wm.values()) if os.path.isabs(f) or ".." in Path(f).parts]
    if bad:
        raise CheckpointError(f"corrupt index {index}: shard names outside the checkpoint: {sorted(bad)}")
    return wm


def stacked_view(views: list[np.ndarray]) -> np.ndarray | None:
    """The views as one zero-copy [E, ...] array when they lie evenly spaced in one buffer, else None."""
    if not views:
        return None
    v0 = views[0]
    if any(v.shape != v0.shape or v.dtype != v0.dtype or not v.flags.c_contiguous for v in views):
        return None
    root = _root(v0)
    if any(_root(v) is not root for v in views):
        return None
    addrs = [v.__array_interface__["data"][0] for v in views]
    step = addrs[1] - addrs[0] if len(addrs) > 1 else v0.nbytes
    if step < v0.nbytes or any(b - a != step for a, b in zip(addrs, addrs[1:])):
        return None
    return np.lib.stride_tricks.as_strided(v0, (len(views), *v0.shape), (step, *v0.strides), writeable=False)


def _root(a: np.ndarray) -> object:
    """The buffer (e.g. the mmap) an array's memory ultimately belongs to."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    root = a if a.base is None else a.base
    return root.obj if isinstance(root, memoryview) else root
