"""loading.readahead: the reading thread's window, its fallback, its end and the pages it reads."""

from __future__ import annotations

import mmap
import sys
import time

import numpy as np
import pytest

from benchmarks.load import drop_cache, resident_fraction
from jaxmoe.loading import readahead as R

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise readahead is Linux's")

MIB = 1 << 20


def _mapped(tmp_path, nbytes: int = 4 * MIB):
    f = tmp_path / "data.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return f, mm, np.frombuffer(mm, np.uint8)


def _settle(ra: R.ReadAhead, timeout: float = 10.0) -> int:
    """The thread's advised bytes once they stop growing for 0.1 s (it waits on its window)."""
    last, t0 = -1, time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        if ra.advised == last:
            return last
        last = ra.advised
    raise AssertionError("the reading thread never settled")


def test_window_paces_the_thread_and_unbounded_lets_it_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "POPULATE_PIECE", 0)  # pieces of the unit
    _, mm, a = _mapped(tmp_path)
    unit, window = 64 << 10, 256 << 10
    views = [a[i * MIB:(i + 1) * MIB] for i in range(4)]  # adjacent: merged into one range
    ra = R.ReadAhead(views, unit=unit, window=window)
    assert ra.total == 4 * MIB
    assert _settle(ra) == window  # one unit at a time, until the window is full
    ra.consumed(MIB)
    assert _settle(ra) == MIB + window
    ra.unbounded()
    ra._thread.join(10)
    assert not ra._thread.is_alive() and ra.advised == 4 * MIB
    del views, a
    ra.close()
    mm.close()


def test_pages_are_read(tmp_path):
    f, mm, a = _mapped(tmp_path, 8 * MIB)
    drop_cache([f])
    before = resident_fraction([f])
    with R.ReadAhead([a], unit=R.readahead_unit(f), window=1 << 40) as ra:
        ra._thread.join(10)
        assert ra.advised == 8 * MIB
    assert resident_fraction([f]) == 1.0, f"resident before {before:.2f}"
    del a
    mm.close()


def test_falls_back_to_willneed_where_populate_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_MADV_POPULATE_READ", 1 << 20)  # an advice no kernel knows: EINVAL
    _, mm, a = _mapped(tmp_path)
    with R.ReadAhead([a[:MIB], a[2 * MIB:]], unit=256 << 10, window=1 << 40) as ra:
        ra._thread.join(10)
        assert ra.advised == 3 * MIB and ra.total == 3 * MIB
    del a
    mm.close()


def test_close_stops_it_and_it_keeps_the_mapping_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "POPULATE_PIECE", 0)
    _, mm, a = _mapped(tmp_path)
    ra = R.ReadAhead([a], unit=64 << 10, window=128 << 10)
    assert _settle(ra) == 128 << 10
    del a
    with pytest.raises(BufferError):
        mm.close()  # the thread's view pins the mapping: no advice on unmapped memory
    ra.close()
    assert not ra._thread.is_alive() and ra.advised < 4 * MIB
    mm.close()  # close let go of the views


def test_readahead_unit():
    unit = R.readahead_unit(__file__)
    assert unit >= 4096 and unit % 4096 == 0
    assert R.readahead_unit("/no/such/file") == R.DEFAULT_UNIT
