"""`python -m benchmarks.quality --quick` on the tiny config: the JSON layout and
sane values. With f32 kernel numerics (exact precision, or a path without a bf16 dot) the CPU
FP8 forward is f32 arithmetic, so its KL to the reference is at rounding level; INT4 changes
the weights, so its KL is larger."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_quick(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import quality  # the repository's benchmarks package

    out = tmp_path / "q.json"
    quality.main(["--quick", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc) == {"metrics", "env", "details"}
    m = doc["metrics"]
    for k in ("fp8_cpu", "int4_cpu"):
        assert 0 <= m[f"{k}_kl_mean"] <= m[f"{k}_kl_max"] and math.isfinite(m[f"{k}_kl_max"])
        assert 0 <= m[f"{k}_top1_agree"] <= 1
    assert m["ppl_reference"] > 1 and doc["details"]["synthetic_weights"] is True
    assert "not meaningful" in doc["details"]["meaning"]
    assert m["int4_cpu_kl_mean"] > m["fp8_cpu_kl_mean"]
    # the scale rules' round-trip MSE: search (the default) < signed < absmax on every distribution
    assert doc["details"]["int4_scale_rule"] == "search"
    for dist, mse in doc["details"]["scale_mse"].items():
        assert 0 < mse["search"] < mse["signed"] < mse["absmax"] < 0.05, dist
    from jaxmoe.cpu import _lib

    if _lib.load().numerics() == "f32":  # f32 kernels: FP8 on the CPU == the reference to rounding
        assert m["fp8_cpu_kl_max"] < 1e-6 and m["fp8_cpu_top1_agree"] == 1.0
