"""`python -m benchmarks.kernels --quick --no-int4` at DeepSeek-V3 expert shapes: the JSON
layout (CPU header, weight draws' code distribution, the kernel path of every row, one block
per precision measured). No timing assertions (the machine is shared)."""

from __future__ import annotations

import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATH_KEYS = {"isa", "precision", "bf16_dot", "kernel_path"}


def test_kernels_quick(tmp_path, run_quick):
    results = ROOT / "benchmarks" / "results" / "kernels.json"
    before = results.read_bytes() if results.exists() else None
    doc = run_quick("kernels", tmp_path, "--no-int4", "--repeats", "1", timeout=600)
    env, m, d = doc["env"], doc["metrics"], doc["details"]
    assert env["cpu"] and env["cpu_class"] in ("avx2", "avx512", "avx512+amx", "other")
    assert isinstance(env["cpu_flags"], list) and env["quick"] is True

    w = d["weights"]
    assert w["checkpoint_like"]["subnormal_frac"] < 1e-3 and 0 <= w["checkpoint_like"]["zero_frac"] < 1e-3
    assert 0.04 < w["uniform_codes"]["subnormal_frac"] < 0.07 and w["uniform_codes"]["codes"] == w["checkpoint_like"]["codes"]

    precs = d["precisions"]
    assert precs in ([None], ["exact"], ["exact", "bf16"], ["bf16"])
    assert set(env["kernel_paths"]) == {p or "default" for p in precs}
    for p in precs:
        sfx = "" if p in (None, "exact") else f"_{p}"
        rows = [*d[f"gemv{sfx}"].values(), d[f"moe_m1{sfx}"], d[f"subnormal_heavy{sfx}"],
                *d[f"gemm{sfx}"]["linear"].values(), *d[f"gemm{sfx}"]["moe"].values()]
        for r in rows:
            assert PATH_KEYS <= set(r), sorted(r)
            assert r["kernel_path"] == env["kernel_paths"][p or "default"]["kernel_path"]
            assert r["precision"] == p
        assert d[f"subnormal_heavy{sfx}"]["draw"] == "uniform_codes"
        for k in ("fp8_gemv_m1_frac_of_read", "moe_layer_m1_ms", "fp8_gemv_m1_subnormal_heavy_slowdown",
                  "gemm_m64_gflops"):
            v = m[k + sfx]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k + sfx, v)
    assert set(d["gemv"]) == {f"t{t}_m{mm}" for t in sorted({1, env["threads"]}) for mm in (1, 8)}
    assert PATH_KEYS <= set(d["dequant_baseline_kernel"]) and "int4" not in d
    assert results.exists() is (before is not None) and (before is None or results.read_bytes() == before)
