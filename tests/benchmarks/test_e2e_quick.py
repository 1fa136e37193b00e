"""`python -m benchmarks.e2e --quick` on the tiny config: the JSON layout, metric keys and sane
values. No timing assertions (the machine is shared)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("decode_tok_s_b1", "decode_frac_of_read_b1", "decode_tok_s_b4", "prefill_tok_s_512", "bytes_per_token",
            "read_gb_s")


def test_e2e_quick(tmp_path, run_quick):
    results = ROOT / "benchmarks" / "results" / "e2e.json"
    before = results.read_bytes() if results.exists() else None
    doc = run_quick("e2e", tmp_path)
    m = doc["metrics"]
    for k in REQUIRED:
        assert k in m, k
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    assert m["prefill_tok_s_4096"] is None  # skipped in --quick, and said so
    assert any("4096" in s for s in doc["details"]["skipped"])

    # bytes per token from the tiny config (hidden 64, 3 layers, 1 dense + 2 MoE, top-2 of width 32, vocab 512)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.e2e import bytes_per_token  # the repository's benchmarks package (no tests/benchmarks/__init__.py)
    from jaxmoe.config import ModelConfig, QuantConfig

    parts = bytes_per_token(ModelConfig.named("tiny").replace(quantization=QuantConfig()))  # the FP8 checkpoint
    assert m["bytes_per_token"] == parts["total"]
    assert parts["lm_head"] == 512 * 64 * 2
    assert parts["routed_experts"] == 2 * 2 * (3 * 32 * 64 + 3 * 4)  # 2 layers x top-2 x 3 matrices (+ 1 scale each)
    d = doc["details"]
    assert d["model"] == "tiny" and d["runtime"] == "cpu-only"
    assert d["kernel_bytes_per_token"] > 0
    for b in ("decode_b1", "decode_b4"):
        r = d["results"][b]
        assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["read_s"]["n"] == r["step_s"]["n"] > 0
    assert 0 < m["decode_frac_of_read_b1"] < 1.5
    bd = d["batch1_breakdown"]
    assert bd["step_ms"] >= bd["executor_ms"] > 0
    env = doc["env"]
    assert env["quick"] is True and len(env["loadavg"]) == 3 and env["cores"] >= 1
    assert results.exists() is (before is not None) and (before is None or results.read_bytes() == before)
