"""The benchmarks' `--quick` runs: `python -m benchmarks.<module> --quick --json PATH` in a
subprocess from the repository root, with its own jaxmoe cache, checked for a zero exit status
and the harness's {metrics, env, details} layout.

The tests take the helper through the `run_quick` fixture: tests/benchmarks has no __init__.py,
so `import conftest` could name another directory's conftest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(module: str, tmp_path: Path, *extra_args: str, timeout: float = 300, cache_dir: Path | None = None) -> dict:
    """Run `python -m benchmarks.<module> --quick *extra_args --json tmp_path/<module>.json` with
    JAXMOE_CACHE_DIR = cache_dir (default tmp_path); the parsed JSON document."""
    out = tmp_path / f"{module}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--quick", *extra_args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAXMOE_CACHE_DIR": str(cache_dir or tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) == {"metrics", "env", "details"}
    return doc


@pytest.fixture(name="run_quick")
def _run_quick_fixture():
    """`run_quick(module, tmp_path, *extra_args, timeout=, cache_dir=) -> dict` (above)."""
    return run_quick
