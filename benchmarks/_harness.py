"""Shared helpers of the benchmarks: timing statistics, the read-only bandwidth yardstick,
environment facts (the CPU's model, class and kernel flags from benchmarks/_cpu.py), and the
`--json PATH` / `--quick` command line with one JSON layout:
`{"metrics": {...}, "env": {...}, "details": {...}}`.

Memory bandwidth on a shared machine drifts (+-20 % and more under load), so a kernel's time
is always paired with a read-only pass over the same bytes measured in the same run, and the
ratio (fraction of the read pass) is the figure to compare across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._cpu import cpu_class, cpu_header, cpu_model  # noqa: F401  (cpu_model: re-exported)

# The engine's benchmarks measure the packed store, as every figure before the weights cache was
# on by default did; a cache written in the background would also take a core from the run.
# benchmarks.load measures the cache itself (weights_cache=PATH); set the variable to measure with it.
os.environ.setdefault("JAXMOE_WEIGHTS_CACHE", "off")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLASS_DIRS = {"avx2": "avx2", "avx512": "avx512", "avx512+amx": "avx512-amx"}


def default_result(name: str) -> Path:
    """Where a benchmark's default full run keeps its JSON: results/<name> on an AVX2 CPU (beside
    the results whose env names no CPU class, all from the AVX2 development box),
    results/<class dir>/<name> on the others, so a run on one class never replaces another
    class's figures."""
    cls = cpu_class()
    return RESULTS_DIR / name if cls in ("avx2", "other") else RESULTS_DIR / CLASS_DIRS[cls] / name


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--json", metavar="PATH", help="write {metrics, env, details} as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (CI)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    return ap


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call: median, min, max over `repeats` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "repeats": repeats}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Like timeit for several functions, alternating them call by call so that a drift of the
    machine (load, bandwidth) hits them alike; the ratio of medians is the stable figure."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": repeats} for k, v in ts.items()}


def read_pass_fn(native, matrices) -> Callable[[], int]:
    """A read-only pass over the packed bytes of `matrices` (cdata jm_matrix*) on the kernels'
    own thread pool: the physical limit of a GEMV over them."""
    arr = native.ffi.new("jm_matrix *[]", list(matrices))
    n = len(matrices)
    return lambda: native.lib.jm_read_pass(arr, n)


def env_info(**extra) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **cpu_header(),
        "cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "commit": commit,
    }
    try:
        import jax  # noqa: PLC0415

        info["jax"] = jax.__version__
    except ImportError:
        pass
    info.update(extra)
    return info


def write(path: str | Path | None, metrics: dict, env: dict, details: dict | None = None) -> dict:
    doc = {"metrics": metrics, "env": env, "details": details or {}}
    text = json.dumps(doc, indent=2, sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return doc
