"""`python -m benchmarks.load --quick` on the tiny config: the JSON layout, metric keys and sane
values. No timing assertions (the machine is shared)."""

from __future__ import annotations

import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POSITIVE = ("checkpoint_bytes", "load_first_s", "load_warm_s", "load_warm_gb_s", "read_warm_gb_s",
            "load_warm_frac_of_read", "load_cold_s", "load_cold_gb_s", "read_cold_gb_s", "load_cold_frac_of_read")


def test_load_quick(tmp_path, run_quick):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.read_bytes() for p in results.rglob("load.json")}
    doc = run_quick("load", tmp_path)
    m = doc["metrics"]
    assert m["model"] == "tiny" and doc["env"]["quick"] is True
    for k in POSITIVE:
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    assert m["load_warm_frac_of_read"] == m["load_warm_gb_s"] / m["read_warm_gb_s"]
    assert isinstance(m["cold_effective"], bool)
    if not m["cold_effective"]:
        assert doc["details"]["cold"]["note"]  # says that the cold figures are not cold
    cached = doc["details"]["cached"]
    assert m["cached_load_gb_s"] is None or (m["cached_load_gb_s"] > 0 and cached["available"])
    assert {p: p.read_bytes() for p in results.rglob("load.json")} == before  # --quick writes only --json
