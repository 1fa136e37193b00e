"""The persistent weights cache: the CPU kernels' packed weights, written once, mapped after.

The first load of a checkpoint onto the CPU kernels repacks every routed expert (the expert
store's slabs) and every large Linear (host matrices) into the kernels' layout. With a cache,
those packed bytes are written once to `<root>/<key>/` (default root:
`jaxmoe.config.cache_dir() / "weights"`); later loads map them read-only (mmap, zero copy:
`jm_store_adopt_slab` / `jm_matrix_adopt`, cpu_ext/src/store_map.c) instead of reading and
repacking the checkpoint's experts: the engine is ready once the non-expert tensors are read.

This module owns the load-time side: the key, what of a placed model goes into data.bin
(`write_cache`), mapping it back into an ExpertStore and the host matrices a placement asks
for (`open_cached`), and `load_placed`, which records or supplies those matrices around the
placement. The directory itself (data.bin / manifest.json layout, checksums, `verify` modes,
atomic write, locking, list and remove) is weights_cache_format.py's; its public names are
re-exported here.

Key (sha256 of the JSON of `key_fields`): the checkpoint's identity (name, size, mtime_ns and
the sha256 of the safetensors header of every *.safetensors file, and config.json's), the
packed format version, the layout constants it was packed for, the load options that change
what is packed (dtype, min_elements, whether only the experts go to the kernels). The packed
layout (pack.c, int4.c) does not depend on the ISA: every path reads the same 4-row tiles of
64-byte segments with K padded to 128 (INT4: superblocks of 8 groups), so the ISA is not in the
key, and neither is the kernels' precision (a runtime choice over the same bytes). INT4 group
size and format come from the checkpoint files, which the key covers.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe.cpu.weights_cache_format import (
    PACK_FORMAT_VERSION,
    VERIFY_MODES,
    CacheError,
    DataWriter,
    default_root,
    human_bytes,
    list_caches,
    locked,
    read_manifest,
    remove_cache,
    remove_dir,
    remove_partial,
    root_or_default,
    verify_dir,
    write_dir,
)

__all__ = [  # with weights_cache_format's public names, as before the split
    "LAYOUT", "MAX_MAPPINGS", "PACK_FORMAT_VERSION", "VERIFY_MODES", "BackgroundWrite", "CacheError", "cache_key",
    "checkpoint_identity",
    "default_root", "human_bytes", "key_fields", "list_caches", "load_placed", "open_cached", "read_manifest",
    "remove_cache", "verify_dir", "write_cache",
]

log = logging.getLogger("jaxmoe.cpu.weights_cache")

# The layout constants the packed bytes depend on (in the key; bump PACK_FORMAT_VERSION too).
LAYOUT = {"tile_rows": 4, "segment_bytes": 64, "k_block": 128, "int4_superblock_groups": 8, "slot_align": 4096}
MAX_MAPPINGS = 30000  # mmaps one cached model may take (a process has vm.max_map_count, 65530 by default)


# ---- the key -------------------------------------------------------------------------------
def _safetensors_header_hash(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(n, 100 << 20))).hexdigest()


_NOT_WEIGHTS = ("tokenizer", "special_tokens", "generation_config", "chat_template")


def checkpoint_identity(path: Path) -> list[dict]:
    """Name, size, mtime_ns (and the safetensors header's sha256) of every file that decides
    the packed weights: *.safetensors, config.json, the index, jaxmoe_int4.json, ..."""
    files = []
    for p in sorted(Path(path).iterdir()):
        if p.suffix == ".safetensors" or (p.suffix == ".json" and not p.name.startswith(_NOT_WEIGHTS)):
            st = p.stat()
            entry = {"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if p.suffix == ".safetensors":
                entry["header_sha256"] = _safetensors_header_hash(p)
            files.append(entry)
    return files


def key_fields(path: Path, *, dtype: Any, min_elements: int, experts_only: bool) -> dict:
    import jax.numpy as jnp  # noqa: PLC0415

    return {"format_version": PACK_FORMAT_VERSION, "layout": LAYOUT, "checkpoint": checkpoint_identity(path),
            "dtype": str(jnp.dtype(dtype)), "min_elements": int(min_elements), "experts_only": bool(experts_only)}


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


# ---- mapping a cache -----------------------------------------------------------------------
class _Adopted:
    """Host matrices of the cache handed out in placement order (HostMatrix.from_weight hook)."""

    def __init__(self, entries, fd, scales, nat):
        self.entries, self.fd, self.scales, self.nat, self.i, self.made = entries, fd, scales, nat, 0, []

    def __call__(self, w, node, native, make):
        from jaxmoe import quant  # noqa: PLC0415
        from jaxmoe.cpu.host_matrix import FMT_BF16, FMT_FP8  # noqa: PLC0415

        if self.i >= len(self.entries):
            raise CacheError("the placement asks for more host matrices than the cache holds")
        e = self.entries[self.i]
        self.i += 1
        fmt = FMT_FP8 if isinstance(w, quant.Fp8Weight) else FMT_BF16
        if (e["format"], e["n"], e["k"]) != (fmt, *w.shape):
            raise CacheError(f"host matrix {self.i - 1} is {e['format']} {e['n']}x{e['k']} in the cache, "
                             f"the placement asks for {fmt} {tuple(w.shape)}")
        self.made.append(_adopt_matrix(self.nat, e, self.fd, self.scales, node))
        return self.made[-1]


def _scale_ptr(nat, scales, e):
    if not e.get("scale_floats"):
        return nat.ffi.NULL
    a = scales[e["scale_offset"] // 4 : e["scale_offset"] // 4 + e["scale_floats"]]
    if a.size != e["scale_floats"]:
        raise CacheError("block scales past the end of data.bin (truncated?)")
    return nat.ffi.cast("float *", a.ctypes.data)


def _adopt_matrix(nat, e, fd, scales, node=-1):
    """The HostMatrix of one cached matrix entry, mapped from data.bin."""
    from jaxmoe.cpu._lib import CpuExtError  # noqa: PLC0415
    from jaxmoe.cpu.host_matrix import HostMatrix  # noqa: PLC0415

    ptr = nat.lib.jm_matrix_adopt(e["format"], e["n"], e["k"], e.get("group", 0), fd, e["offset"],
                                  _scale_ptr(nat, scales, e), node)
    if ptr == nat.ffi.NULL:
        raise CacheError(f"cannot map a cached matrix: {CpuExtError(nat.error())}")
    got = nat.ffi.new("int64_t *")
    nat.check(nat.lib.jm_matrix_info(ptr, nat.ffi.NULL, nat.ffi.NULL, nat.ffi.NULL, got))
    if int(got[0]) != e["bytes"]:
        nat.lib.jm_matrix_free(ptr)
        raise CacheError(f"a cached matrix has {e['bytes']} bytes, this library packs it into {int(got[0])}")
    return HostMatrix(ptr, e["n"], e["k"], e["format"], nat)


def _open(d: Path, m: dict, native=None):
    """(ExpertStore with every cached layer adopted, host-matrix hook, fd) from a verified dir."""
    from jaxmoe.cpu._lib import load  # noqa: PLC0415
    from jaxmoe.cpu.expert_store import ExpertStore  # noqa: PLC0415

    nat = native or load()
    fd = os.open(d / "data.bin", os.O_RDONLY)
    scales = np.memmap(d / "data.bin", np.float32, "r")
    store = ExpertStore(m["n_layers"], nat)
    try:
        for lay in m["layers"]:
            store.init_layer(lay["layer"], lay["n_experts"], lay["hidden"], lay["inter"])
        for e in m["slabs"]:
            rc = nat.lib.jm_store_adopt_slab(store._live_ptr(), e["layer"], e["which"], e["format"], fd, e["offset"],
                                             e["slot_bytes"], _scale_ptr(nat, scales, e), -1)
            if rc != 0:
                raise CacheError(f"cannot map layer {e['layer']}'s slab {e['which']}: {nat.error()}")
        for lay in m["layers"]:
            li, mats = lay["layer"], lay.get("experts") or []
            for x, trio in enumerate(mats):
                store.set_expert(li, x, *[_adopt_matrix(nat, e, fd, scales) for e in trio])
            store._layer_shape(li, complete=True)
    except BaseException:
        store.free()
        os.close(fd)
        raise
    return store, _Adopted(m["host_matrices"], fd, scales, nat), fd


def open_cached(root: Path, key: str, verify: str = "sample", native=None):
    """(store, hook, fd, manifest) of a sound cache; CacheError when it is missing or unsound."""
    d = root / key
    if not d.exists():
        raise CacheError(f"no cache {d}")
    with locked(root, key, exclusive=False):
        m = verify_dir(d, verify, key)
        store, hook, fd = _open(d, m, native)
    return store, hook, fd, m


# ---- writing a cache -----------------------------------------------------------------------
def _put(w: DataWriter, e: dict, data, scale) -> dict:
    """e with the offsets of data and of its float32 block scales (None: BF16, no scales) written through w."""
    e["offset"] = w.put(data)
    if scale is not None:
        e.update(scale_offset=w.put(scale), scale_floats=memoryview(scale).nbytes // 4)
    return e


def _packed(nat, ptr) -> tuple[dict, Any, Any]:
    """(entry: format, n, k, group, bytes; its packed bytes; its float32 block scales or None) of
    a native matrix, the buffers borrowing its memory."""
    fmt, n, k = nat.ffi.new("int32_t *"), nat.ffi.new("int32_t *"), nat.ffi.new("int32_t *")
    nat.check(nat.lib.jm_matrix_info(ptr, fmt, n, k, nat.ffi.NULL))
    p = [nat.ffi.new("const uint8_t **"), nat.ffi.new("int64_t *"), nat.ffi.new("const float **"),
         nat.ffi.new("int64_t *"), nat.ffi.new("int32_t *")]
    nat.check(nat.lib.jm_matrix_packed(ptr, *p))
    data = nat.ffi.buffer(p[0][0], int(p[1][0]))
    floats = int(p[3][0])
    scale = nat.ffi.buffer(p[2][0], 4 * floats) if floats else None
    return {"format": int(fmt[0]), "n": int(n[0]), "k": int(k[0]), "group": int(p[4][0]), "bytes": len(data)}, data, scale


def _put_matrix(w: DataWriter, nat, ptr) -> dict:
    return _put(w, *_packed(nat, ptr))


def _read_ahead(d: Path, store, host_matrices):
    """A ReadAhead (loading.readahead) over what a cache hit mapped: the host matrices (every
    token reads them), then the expert slabs and loose expert matrices, as fast as the disk gives
    them. A cold cache is then read sequentially in the background instead of a page fault at a
    time by the first tokens; a resident one costs the mapping of its pages."""
    from jaxmoe.loading.readahead import ReadAhead, readahead_unit  # noqa: PLC0415

    nat = store._nat
    ptrs = [hm._ptr for hm in host_matrices]
    views = []
    for li, n_experts, _, _, layer_slabs in _layers(store):
        views += [s[0] for s in layer_slabs if s is not None]
        if any(s is None for s in layer_slabs):
            ptrs += [ptr for trio in _loose_matrices(store, li, n_experts) for ptr in trio]
    mats = [np.frombuffer(_packed(nat, p)[1], np.uint8) for p in ptrs]
    return ReadAhead(mats + views, unit=readahead_unit(d / "data.bin"), window=1 << 62)


def _loose_matrices(store, li: int, n_experts: int) -> list[list]:
    """The native gate / up / down matrices of each expert of a layer kept outside slabs (INT4)."""
    return [[store._nat.lib.jm_store_matrix(store._live_ptr(), li, x, j) for j in range(3)] for x in range(n_experts)]


def _layers(store):
    """(layer, n_experts, hidden, inter, its three projections' slabs, None where not in one)
    of every layer of the store that has experts."""
    for li in range(store.n_layers):
        n_experts, hidden, inter = store._layer_shape(li)
        if n_experts:
            yield li, n_experts, hidden, inter, [store.slab(li, which) for which in range(3)]


def _write_contents(w: DataWriter, store, host_matrices) -> dict:
    nat = store._nat
    layers, slabs = [], []
    for li, n_experts, hidden, inter, layer_slabs in _layers(store):
        lay = {"layer": li, "n_experts": n_experts, "hidden": hidden, "inter": inter}
        loose = [which for which, s in enumerate(layer_slabs) if s is None]
        for which, s in enumerate(layer_slabs):
            if s is not None:
                data, scale, _ = s
                e = {"layer": li, "which": which, "format": 1 if scale is not None else 2, "slot_bytes": int(data.shape[1])}
                slabs.append(_put(w, e, data, None if scale is None else np.ascontiguousarray(scale)))
        if loose:
            if len(loose) != 3:
                raise CacheError(f"layer {li} mixes slabs and loose expert matrices: not cached")
            lay["experts"] = [[_put_matrix(w, nat, ptr) for ptr in trio] for trio in _loose_matrices(store, li, n_experts)]
        layers.append(lay)
    mats = [_put_matrix(w, nat, hm._ptr) for hm in host_matrices]
    return {"n_layers": store.n_layers, "layers": layers, "slabs": slabs, "host_matrices": mats}


def _mappings(store) -> int:
    """mmaps a cached store takes: one per slab, one per expert matrix outside slabs."""
    return sum(1 if s is not None else n_experts for _, n_experts, _, _, slabs in _layers(store) for s in slabs)


def _cache_bytes(store, host_matrices) -> int:
    """About what the cache of this store and these matrices takes on disk."""
    return store.nbytes + sum(hm.nbytes for hm in host_matrices)


def write_cache(root: Path, key: str, fields: dict, store, host_matrices, verify: str = "sample",
                source: Path | None = None, cancel=None) -> Path | None:
    """Writes the cache of a placed model atomically; None when a sound one (checked as `verify`
    says) is there already, e.g. written by another process while this one waited for the lock.
    cancel: a threading.Event that stops the write (CacheError, nothing left behind)."""
    with locked(root, key, exclusive=True):
        with contextlib.suppress(CacheError):
            verify_dir(root / key, verify, key)
            return None
        remove_partial(root, key)
        maps = _mappings(store) + len(host_matrices)
        if maps > MAX_MAPPINGS:
            raise CacheError(f"mapping it would take {maps} mmaps (one per slab and per loose matrix, e.g. INT4 experts), "
                             f"more than {MAX_MAPPINGS} (the kernel's vm.max_map_count is 65530 by default)")
        need = _cache_bytes(store, host_matrices)
        free = shutil.disk_usage(root).free
        if free < need + max(need // 10, 1 << 30):  # leave the disk some room
            raise CacheError(f"not enough free disk space ({human_bytes(free)} free, the cache needs "
                             f"{human_bytes(need)})")
        return write_dir(root, key, fields, source, lambda w: _write_contents(w, store, host_matrices), cancel)


class BackgroundWrite:
    """`write_cache` on a thread of its own, so that the load which packed the weights returns at
    once and serves while they are written. The thread holds the store and host matrices until it
    ends; `stop()` (Model.close) cancels it and waits, leaving either a whole cache or none. At
    the interpreter's exit it is finished (`_finish_writes`). A write that fails warns, as a synchronous one does."""

    def __init__(self, root: Path, key: str, write):
        self.root, self.key, self.path, self.cancel = root, key, None, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(write,), name="jaxmoe-weights-cache-write", daemon=True)
        with _writes_lock:
            _writes.add(self)
        self._thread.start()

    def _run(self, write) -> None:
        try:
            self.path = _write_reported(self.root, write, self.cancel)
        finally:
            with _writes_lock:
                _writes.discard(self)

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the write; whether it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Cancels the write (if it is still going) and waits for the thread."""
        self.cancel.set()
        self._thread.join()


def _write_reported(root: Path, write, cancel=None) -> Path | None:
    """write(cancel) -> the cache directory or None (a sound one was there); logs what it wrote,
    warns when it could not write (not when it was cancelled). Never raises OSError / CacheError."""
    t0 = time.perf_counter()
    try:
        d = write(cancel)
    except (OSError, CacheError) as e:
        if cancel is None or not cancel.is_set():
            warnings.warn(f"could not write the weights cache under {root}: {e}", stacklevel=2)
        return None
    if d is not None:
        log.info("weights cache: wrote %s (%s) in %.2f s%s", d, human_bytes((d / "data.bin").stat().st_size),
                 time.perf_counter() - t0, ", in the background" if cancel is not None else "")
    return d


_writes: set[BackgroundWrite] = set()
_writes_lock = threading.Lock()


@atexit.register
def _finish_writes() -> None:
    """At the interpreter's exit an unfinished background write is finished, not lost: a one-shot
    `jaxmoe generate` ends before its cache is written and would pack again at every run. Ctrl-C
    cancels it (a whole cache or none, as ever)."""
    with _writes_lock:
        live = list(_writes)
    if not live:
        return
    print(f"jaxmoe: finishing the weights cache write ({', '.join(str(w.root / w.key) for w in live)}) before "
          "exiting; Ctrl-C skips it", file=sys.stderr, flush=True)
    try:
        for w in live:
            w.join()
    except KeyboardInterrupt:
        for w in live:
            w.stop()


# ---- the load path -------------------------------------------------------------------------
class _Recorder:
    """Records the host matrices placement creates (HostMatrix.from_weight hook), in order."""

    def __init__(self):
        self.made = []

    def __call__(self, w, node, native, make):
        m = make(w, node, native)
        self.made.append(m)
        return m


def load_placed(path: Path, *, load, place, dtype: Any, progress: Any, experts_only: bool, root: Path | None = None,
                verify: str | None = None, native=None, load_rest=None, background: bool = False):
    """(cfg, placed weights, BackgroundWrite or None, ReadAhead or None) through the cache at
    `root` (default: default_root()): mapped from a sound cache (with a ReadAhead reading what
    was mapped: `_read_ahead`), else loaded and placed as without a cache and then written to it
    (a warning says why an existing cache was not used); background: that write runs on a thread
    (the BackgroundWrite), else before this returns. The owner stops either thread before
    freeing the weights. load() -> (cfg, weights without the routed
    experts, ExpertStore holding them) and place(cfg, weights, store) -> placed weights are the
    uncached load (jaxmoe.generate). load_rest() -> (cfg, weights without the routed experts):
    what a cache hit reads from the checkpoint (default: DeepSeek-V3's loader with load_experts=False;
    another model family passes its own). verify: VERIFY_MODES; None: $JAXMOE_WEIGHTS_CACHE_VERIFY,
    else "sample"."""
    from jaxmoe.cpu import host_matrix  # noqa: PLC0415
    from jaxmoe.loading.loader import load_checkpoint  # noqa: PLC0415

    root = root_or_default(root)
    verify = verify or os.environ.get("JAXMOE_WEIGHTS_CACHE_VERIFY") or "sample"
    fields = key_fields(path, dtype=dtype, min_elements=(1 << 62) if experts_only else 0, experts_only=experts_only)
    key = cache_key(fields)
    t0 = time.perf_counter()
    if (root / key).exists():
        try:
            store, hook, fd, m = open_cached(root, key, verify, native)
        except CacheError as e:
            warnings.warn(f"weights cache {root / key} is not usable, rebuilding it: {e}", stacklevel=3)
        else:
            try:
                if load_rest is None:
                    cfg, weights = load_checkpoint(path, dtype=dtype, progress=progress, load_experts=False)
                else:
                    cfg, weights = load_rest()
                with host_matrix.from_weight_hook(hook):
                    placed = place(cfg, weights, store)
                if hook.i != len(hook.entries):
                    raise CacheError(f"the cache holds {len(hook.entries)} host matrices, the placement used {hook.i}")
            except CacheError as e:
                store.free()
                for hm in hook.made:
                    hm.free()
                warnings.warn(f"weights cache {root / key} does not match this placement, rebuilding it: {e}",
                              stacklevel=3)
                remove_dir(root, key, ignore_errors=True)
            else:
                log.info("weights cache: mapped %s (%s) in %.2f s", root / key, human_bytes(m["data_bytes"]),
                         time.perf_counter() - t0)
                return cfg, placed, None, _read_ahead(root / key, store, hook.made)
            finally:
                os.close(fd)
    cfg, weights, store = load()
    rec = _Recorder()
    with host_matrix.from_weight_hook(rec):
        placed = place(cfg, weights, store)
    store = store or _store_of(placed)
    if store is None:
        return cfg, placed, None, None
    source = Path(path).resolve()

    def write(cancel):
        return write_cache(root, key, fields, store, rec.made, verify, source, cancel=cancel)

    if background:  # the default cache: said where the progress bar speaks (stderr), not only logged
        note = (f"weights cache: writing {root / key} (about {human_bytes(_cache_bytes(store, rec.made))}) in the "
                f"background; weights_cache=False (or JAXMOE_WEIGHTS_CACHE=off) turns the cache off")
        log.info("%s", note)
        if progress is not False:
            print(f"jaxmoe: {note}", file=sys.stderr, flush=True)
        return cfg, placed, BackgroundWrite(root, key, write), None
    _write_reported(root, write)
    return cfg, placed, None, None


def _store_of(placed):
    import jax  # noqa: PLC0415

    from jaxmoe.cpu.handles import HostExperts  # noqa: PLC0415
    from jaxmoe.cpu.host_matrix import live_owners  # noqa: PLC0415

    for leaf in jax.tree_util.tree_leaves(placed, is_leaf=lambda x: isinstance(x, HostExperts)):
        if isinstance(leaf, HostExperts):
            return live_owners.get(leaf.store)
    return None
