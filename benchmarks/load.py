"""Load throughput: `jaxmoe.load` of a synthetic FP8 checkpoint (runtime cpu-only, the CPU
kernels), in GB/s of the checkpoint's files, each paired in the same run with a read-only pass
over those files (os.readv of every byte into one 16 MiB buffer); ratio = load GB/s / read-pass
GB/s, the figure to compare across runs (a shared machine drifts).

- warm: the page cache holds the files (a read pass just read them). The process's first load
  (`first`, which also starts the native library and JAX) and the median of the repeats.
- cold: the files dropped from the page cache with posix_fadvise(DONTNEED) before the load
  and before its read pass, `repeats` such pairs (7 by default, the odd ones reading first: the
  pair of median fraction reported; the disk drifts more than the page cache); whether dropping worked is measured (mincore: the
  resident fraction left, the most of any drop) and reported as `cold_effective` (false: the
  cold figures are warm ones in disguise).
- cached: the second of two loads with `weights_cache=` (the packed-weights cache: mapped,
  not repacked), when this jaxmoe has that argument; else null.

Also in details: a read pass through mmap + numpy sum (no copy out of the page cache).

    python -m benchmarks.load [--quick] [--json PATH] [--model bench-v3-mid] [--repeats N]

--quick: the tiny config in a throwaway directory, one repeat (CI). Results: PATH if given, and
benchmarks/results/load.json (per CPU class: _harness.default_result) for a full run.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as H
from benchmarks.e2e import checkpoint

GB = 1e9
_BUF = 16 << 20


def files_of(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def read_pass(files: list[Path]) -> tuple[float, int]:
    """(seconds, bytes) of reading every byte of `files` once (os.readv into one buffer)."""
    buf = bytearray(_BUF)
    views = [memoryview(buf)]
    n = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while k := os.readv(fd, views):
                n += k
        finally:
            os.close(fd)
    return time.perf_counter() - t0, n


def mmap_sum_pass(files: list[Path]) -> float:
    """Seconds of summing every byte of `files` through read-only mmaps (numpy)."""
    import numpy as np  # noqa: PLC0415

    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            a = np.frombuffer(mm, np.uint8)
            n8 = len(a) // 8 * 8
            int(a[:n8].view(np.uint64).sum(dtype=np.uint64)) + int(a[n8:].sum())
            del a
            mm.close()
    return time.perf_counter() - t0


def drop_cache(files: list[Path]) -> None:
    """Asks the kernel to drop the files' clean pages (posix_fadvise DONTNEED)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = resident = 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                base = _mmap_address(mm)
                if base is None or mincore(base, size, vec) != 0:
                    return None
                resident += sum(v & 1 for v in vec)
                total += pages
            finally:
                mm.close()
    return resident / total if total else None


def _mmap_address(mm: mmap.mmap) -> int | None:
    """The address of a read-only mmap (through numpy, which can view it)."""
    import numpy as np  # noqa: PLC0415

    try:
        return int(np.frombuffer(mm, np.uint8, count=1).ctypes.data)
    except (ValueError, TypeError):
        return None


def timed_load(path: Path, **kw) -> float:
    import jaxmoe  # noqa: PLC0415

    gc.collect()
    t0 = time.perf_counter()
    model = jaxmoe.load(path, runtime="cpu-only", cpu_kernels=True, progress=False, **kw)
    dt = time.perf_counter() - t0
    model.close()  # frees the native memory now
    del model
    gc.collect()
    return dt


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="jaxmoe/configs/models name (default bench-v3-mid; tiny with --quick)")
    ap.add_argument("--root", default=None, help="where the synthetic checkpoint is kept (default jaxmoe's cache dir)")
    args = ap.parse_args(argv)
    name = args.model or ("tiny" if args.quick else "bench-v3-mid")
    repeats = args.repeats or (1 if args.quick else 3)
    cold_repeats = args.repeats or (1 if args.quick else 7)  # this VM's disk moves one pair's fraction by +-0.2

    import jaxmoe  # noqa: PLC0415
    from jaxmoe.config import cache_dir  # noqa: PLC0415
    from jaxmoe.cpu._lib import load as load_native  # noqa: PLC0415

    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-load-") if args.quick and args.root is None else None
    root = Path(tmp.name) if tmp else Path(args.root) if args.root else cache_dir()
    try:
        path, _ = checkpoint(name, root)
        files = files_of(path)
        nbytes = sum(f.stat().st_size for f in files)
        kw = {}
        has_cache = "weights_cache" in inspect.signature(jaxmoe.load).parameters
        if has_cache:
            kw["weights_cache"] = False

        # warm: read pass (fills the page cache), then the process's first load, then pairs
        read_pass(files)
        t_first = timed_load(path, **kw)
        warm_load, warm_read, mmap_read = [], [], []
        for _ in range(repeats):
            warm_read.append(read_pass(files)[0])
            mmap_read.append(mmap_sum_pass(files))
            warm_load.append(timed_load(path, **kw))

        # cold, `repeats` pairs: drop the pages, check, load; drop again, check, read pass (the disk's
        # rate drifts more than the page cache's: the figure is the median pair's fraction). Odd pairs
        # read first: on this project's VM a cold load just after a cold read pass took 0.4-0.7 s more than
        # one after a warm load (fresh processes, three each), so a fixed order would charge the load.
        cold_pairs, lefts = [], {"load": [], "read": []}
        for i in range(cold_repeats):
            t = {}
            for what in ("load", "read") if i % 2 == 0 else ("read", "load"):
                drop_cache(files)
                lefts[what].append(resident_fraction(files))
                t[what] = timed_load(path, **kw) if what == "load" else read_pass(files)[0]
            cold_pairs.append((t["load"], t["read"]))
        cold_load, cold_read = sorted(cold_pairs, key=lambda p: p[1] / p[0])[len(cold_pairs) // 2]
        known = None not in lefts["load"] + lefts["read"]  # mincore could be asked
        left, left_read = (max(lefts["load"]), max(lefts["read"])) if known else (None, None)
        effective = known and max(left, left_read) < 0.1

        cached = {"available": has_cache}
        if has_cache:
            cdir = tempfile.TemporaryDirectory(prefix="jaxmoe-load-cache-")
            try:
                read_pass(files)
                cached["first_s"] = timed_load(path, weights_cache=cdir.name)  # writes the cache
                ts, rs = [], []
                for _ in range(repeats):
                    rs.append(read_pass(files)[0])
                    ts.append(timed_load(path, weights_cache=cdir.name))
                cached.update(load_s=statistics.median(ts), read_s=statistics.median(rs), all_s=ts)
            except Exception as e:  # another part's feature: report it, do not fail the run
                cached["error"] = f"{type(e).__name__}: {e}"
            finally:
                cdir.cleanup()

        med = statistics.median
        rate = lambda s: nbytes / GB / s if s else None  # noqa: E731
        m = {
            "model": name,
            "checkpoint_bytes": nbytes,
            "load_first_s": t_first,
            "load_first_gb_s": rate(t_first),
            "load_warm_s": med(warm_load),
            "load_warm_gb_s": rate(med(warm_load)),
            "read_warm_gb_s": rate(med(warm_read)),
            "load_warm_frac_of_read": rate(med(warm_load)) / rate(med(warm_read)),
            "load_first_frac_of_read": rate(t_first) / rate(med(warm_read)),
            "load_cold_s": cold_load,
            "load_cold_gb_s": rate(cold_load),
            "read_cold_gb_s": rate(cold_read),
            "load_cold_frac_of_read": rate(cold_load) / rate(cold_read),
            "cold_effective": effective,
            "cached_load_gb_s": rate(cached["load_s"]) if "load_s" in cached else None,
            "cached_frac_of_read": rate(cached["load_s"]) / rate(cached["read_s"]) if "load_s" in cached else None,
        }
        nat = load_native()
        details = {
            "model": name,
            "files": len(files),
            "warm": {"load_s": warm_load, "read_s": warm_read, "mmap_sum_s": mmap_read,
                     "read_mmap_sum_gb_s": rate(med(mmap_read)),
                     "load_frac_of_mmap_sum": rate(med(warm_load)) / rate(med(mmap_read))},
            "cold": {"resident_fraction_after_drop": left, "resident_fraction_before_read": left_read,
                     "pairs_load_read_s": cold_pairs,
                     "method": "posix_fadvise(POSIX_FADV_DONTNEED) per file, checked with mincore",
                     "note": None if effective else "dropping the page cache was not effective here: the cold "
                     "figures are (partly) warm ones"},
            "cached": cached,
            "read_pass": "os.readv of every byte into one 16 MiB buffer; mmap_sum: numpy sum over read-only mmaps",
            "command": "python -m benchmarks.load" + (" --quick" if args.quick else f" --model {name}"),
        }
        env = H.env_info(quick=args.quick, loadavg=list(os.getloadavg()), kernel_threads=int(nat.lib.jm_num_threads()))
        doc = H.write(args.json, m, env, details)
        if not args.quick:
            H.write(H.default_result("load.json"), m, env, details)
        print(f"{name}: {nbytes / GB:.2f} GB; load warm {m['load_warm_s']:.2f} s = {m['load_warm_gb_s']:.2f} GB/s "
              f"(first {t_first:.2f} s) vs read pass {m['read_warm_gb_s']:.2f} GB/s: {m['load_warm_frac_of_read']:.3f}; "
              f"cold {m['load_cold_gb_s']:.2f} GB/s vs {m['read_cold_gb_s']:.2f} GB/s"
              f"{'' if effective else ' (page cache drop not effective)'}; cached "
              + (f"{m['cached_load_gb_s']:.2f} GB/s" if m["cached_load_gb_s"] else str(cached.get("error", "n/a"))),
              file=sys.stderr)
        return doc
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
