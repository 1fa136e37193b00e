"""Reading a memory-mapped checkpoint ahead of its use, on a thread of its own.

`ReadAhead(views)` has the kernel read the pages under `views` and map them (madvise
MADV_POPULATE_READ), in their order, at most `window` bytes beyond what the consumer has
reported (`consumed`): the disk reads the next tensors while the CPU packs the current ones,
the packer then finds its pages mapped (no page faults), and the page cache the load pins down
stays bounded. Nothing is copied; pages already cached cost only their mapping.

Measured on this project's 2-core VM (AVX2 EPYC, ext4 on virtio, 6.18; a cold pass over
bench-v3-mid's 4.78 GB): POPULATE_READ in 8 MiB pieces 1.1-1.9 s with 0.06-0.08 core-seconds of
CPU; WILLNEED in pieces 2.0-2.1 s with 1.6 core-s; read() into a 1 MiB buffer 1.3-2.3 s with
0.4-0.9 core-s. On two cores that the packing needs, the CPU the reading takes is what counts.
Facts of Linux behind it:
- POPULATE_READ (5.14+) returns when the pages are read: the thread is paced by the disk.
  Its pieces are the readahead unit but at least POPULATE_PIECE. Where the kernel lacks it
  (EINVAL) the thread falls back to MADV_WILLNEED, which only starts the reads, and reads at
  most the device's readahead unit (the block device's `read_ahead_kb`: 8 MiB on the VM,
  128 KiB by default) from the start of the range it is given (`force_page_cache_ra` clamps
  it). Hence pieces of that unit there: a single WILLNEED over a 458 MB lm_head read 8 MB of it.
- Either blocks while the device's queue is full. On the loader's own thread that stalled the
  packing (0.4 s of a 3.5 s cold load); here it paces the reading thread to the disk.

Where the platform has no madvise this does nothing, and a page is read when it is touched.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_MADV_WILLNEED, _MADV_POPULATE_READ, _EINVAL, _PAGE = 3, 22, 22, 4096
DEFAULT_UNIT = 128 << 10  # Linux's default read_ahead_kb
DEFAULT_WINDOW = 512 << 20  # bytes advised beyond what the consumer has reported
POPULATE_PIECE = 8 << 20  # bytes per POPULATE_READ at least (it reads all it is given; 2-32 MiB read alike)


def _madvise():
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


_madvise_fn = _madvise() if sys.platform.startswith("linux") else None


def readahead_unit(path: str | Path) -> int:
    """Bytes one WILLNEED reads on the device holding `path`: its block device's read_ahead_kb
    (the whole disk's, for a partition), DEFAULT_UNIT where sysfs does not say."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return DEFAULT_UNIT
    node = f"{os.major(dev)}:{os.minor(dev)}"
    for f in (f"/sys/dev/block/{node}/queue/read_ahead_kb", f"/sys/dev/block/{node}/../queue/read_ahead_kb",
              f"/sys/class/bdi/{node}/read_ahead_kb"):
        try:
            kb = int(Path(f).read_text())
        except (OSError, ValueError):
            continue
        if kb > 0:
            return kb << 10
    return DEFAULT_UNIT


def _ranges(views: Iterable[np.ndarray]) -> list[list]:
    """[page-aligned address, bytes, [the views]] under the non-empty views, adjacent ones
    merged. The views are kept: they keep their mapping alive while its pages are advised."""
    out: list[list] = []
    for a in views:
        if not a.nbytes:
            continue
        addr = a.ctypes.data
        start = addr - addr % _PAGE
        end = addr + a.nbytes
        if out and out[-1][0] <= start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], end - out[-1][0])
            out[-1][2].append(a)
        else:
            out.append([start, end - start, [a]])
    return out


class ReadAhead:
    """A thread advising the kernel of `views`' pages in order (module doc), at most `window`
    bytes beyond those the consumer has reported with `consumed(nbytes)`; `unbounded()` lifts
    the window. It holds each view until its pages are advised (a closed checkpoint's mapping
    lives on until then) and ends by itself after the last; `close()` (or the with block)
    stops it early and joins it."""

    def __init__(self, views: Iterable[np.ndarray], *, unit: int = DEFAULT_UNIT, window: int = DEFAULT_WINDOW):
        self._ranges = _ranges(views) if _madvise_fn is not None else []
        self.unit, self.window = max(int(unit), _PAGE), int(window)
        self.total = sum(r[1] for r in self._ranges)
        self.advised = 0  # bytes advised so far (the thread's)
        self._consumed = 0
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="jaxmoe-readahead", daemon=True)
        if self._ranges:
            self._thread.start()

    def consumed(self, nbytes: int) -> None:
        with self._cv:
            self._consumed += int(nbytes)
            self._cv.notify()

    def unbounded(self) -> None:
        with self._cv:
            self.window = 1 << 62
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._ranges = []  # the views go

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        advice, step = _MADV_POPULATE_READ, max(self.unit, POPULATE_PIECE)
        for i, (start, n, _) in enumerate(self._ranges):
            off = 0
            while off < n:
                k = min(step, n - off)
                with self._cv:
                    self._cv.wait_for(lambda: self._stop or self.advised - self._consumed < self.window)
                    if self._stop:
                        return
                # ctypes lets go of the GIL; errors (a mapping gone) only cost the advice
                if _madvise_fn(start + off, k, advice) and advice == _MADV_POPULATE_READ and ctypes.get_errno() == _EINVAL:
                    advice, step = _MADV_WILLNEED, self.unit  # a kernel before 5.14: WILLNEED reads one unit
                    continue
                off += k
                self.advised += k
            self._ranges[i] = None  # its views may go
