"""Writing a checkpoint directory from lazily produced tensors: sharded safetensors, the index,
config.json and any extra files, atomically, with a progress bar.

    groups = [TensorGroup([(name, dtype, shape), ...], make), ...]
    write_tensor_groups(path, config_dict, groups, max_shard_bytes=DEFAULT_SHARD_BYTES)

A `TensorGroup` declares its tensors' names, dtypes and shapes up front and makes their data
only when the writer reaches it (`make()`), so a checkpoint larger than RAM is written group by
group. Groups fill `model.safetensors`, or `model-0000i-of-0000n.safetensors` +
`model.safetensors.index.json` past `max_shard_bytes`, in order. Within a file tensors are
ordered like the safetensors library does (itemsize descending: aligned, no holes), in group
order within an itemsize, so evenly sized tensors of one kind are evenly spaced
(`safetensors_index.stacked_view`). Everything goes to a temporary sibling directory renamed
into place at the end, so a failed or interrupted write leaves nothing behind.

`write_safetensors(file, arrays, metadata=..., fsync=True)` writes one file (no directory, no
atomicity of its own: callers write a temporary name and rename it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe.loading.progress import Progress
from jaxmoe.loading.safetensors_index import DTYPE_NAMES, INDEX_NAME

DEFAULT_SHARD_BYTES = 2 << 30


@dataclasses.dataclass
class TensorGroup:
    """Tensors produced together (e.g. an FP8 weight and its scale): their [(name, dtype, shape)]
    and `make()`, which returns {name: array} with exactly those dtypes and shapes."""

    tensors: list[tuple[str, np.dtype, tuple[int, ...]]]
    make: Callable[[], dict[str, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.tensors)


def write_tensor_groups(
    path: str | Path,
    config: dict[str, Any],
    groups: Sequence[TensorGroup],
    *,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], dict[str, Any]] | None = None,
    progress: bool | None = None,
) -> Path:
    """Write `groups` and config.json to the directory `path`, atomically; returns `path`.

    max_shard_bytes: None or 0 = one file. extra(tmp): called after the tensors are written to
    add files to the temporary directory; the dict it returns is merged into config.json.
    progress: a bar on stderr; None = only on a terminal and only once the write passes ~1 s.
    Raises FileExistsError if `path` exists and not `overwrite`, ValueError if a group makes a
    tensor other than the one it declared.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        shards = _plan_shards(groups, max_shard_bytes)
        total = sum(g.nbytes for g in groups)
        bar = Progress(len(groups), total, enabled=progress, label=f"writing {path.name}")
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tmp / fname, shard, bar)
            weight_map.update({n: fname for g in shard for n, _, _ in g.tensors})
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if extra is not None:
            config = {**config, **extra(tmp)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, trash / "old")
            os.rename(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _plan_shards(groups: Sequence[TensorGroup], max_shard_bytes: int | None) -> list[list[TensorGroup]]:
    shards: list[list[TensorGroup]] = [[]]
    size = 0
    for g in groups:
        if max_shard_bytes and shards[-1] and size + g.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    return shards


def write_safetensors(file: str | Path, arrays: dict[str, np.ndarray], *, metadata: dict[str, str] | None = None,
                      fsync: bool = False) -> int:
    """Write `arrays` as the one safetensors file `file` (replaced if it exists); returns its size in bytes.

    metadata: extra `__metadata__` entries (str -> str, beside "format": "pt"). fsync: flush the
    data to disk before returning. Raises ValueError for a dtype safetensors cannot name.
    """
    bad = {n: a.dtype for n, a in arrays.items() if a.dtype not in DTYPE_NAMES}
    if bad:
        raise ValueError(f"no safetensors dtype for {bad}")
    group = TensorGroup([(n, a.dtype, a.shape) for n, a in arrays.items()], lambda: arrays)
    return _write_shard(Path(file), [group], None, metadata=metadata, fsync=fsync)


def _write_shard(file: Path, groups: list[TensorGroup], bar: Progress | None, *,
                 metadata: dict[str, str] | None = None, fsync: bool = False) -> int:
    """Header first (all shapes are known), then each group's data at its offsets as it is made.
    Returns the file's size."""
    entries = [t for g in groups for t in g.tensors]
    entries.sort(key=lambda t: -t[1].itemsize)  # stable: group order within an itemsize
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError(f"safetensors metadata must map str to str, got {meta!r}")
    header: dict[str, Any] = {"__metadata__": meta}
    offsets, pos = {}, 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(start + pos)
        for g in groups:
            arrays = g.make()
            for name, dtype, shape in g.tensors:
                a = np.ascontiguousarray(arrays[name])
                if a.dtype != dtype or a.shape != shape:
                    raise ValueError(f"{name}: made {a.dtype} {a.shape}, planned {dtype} {shape}")
                f.seek(start + offsets[name])
                f.write(a.reshape(-1).view(np.uint8).data)
            if bar is not None:
                bar.update(1, g.nbytes)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return start + pos
