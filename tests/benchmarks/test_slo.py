"""benchmarks/slo.py (measuring) and benchmarks/_plots.py (drawing): `--quick` on the tiny
model writes the JSON, the markdown table and the PNGs; the table and plots come from the
JSON alone. No timing assertions (the machine is shared)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as H  # noqa: E402
from benchmarks import _plots  # noqa: E402
from benchmarks.slo import percentiles, stalls, summary  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _doc() -> dict:
    step = {"median": 0.01, "min": 0.009, "max": 0.012, "n": 3}
    res = {
        "model": "demo", "n_slots": 4, "chunk_size": 64, "max_len": 4096,
        "ttft": [{"prompt": 64, "s": 0.5, "min": 0.4, "max": 0.6}, {"prompt": 1024, "s": 9.0, "min": 8.5, "max": 9.5}],
        "decode_context": [{"batch": 1, "context": 64, "tok_s": 100.0, "tok_s_per_request": 100.0, "step_s": step,
                            "read_gb_s": 30.0},
                           {"batch": 1, "context": 2048, "tok_s": 80.0, "tok_s_per_request": 80.0, "step_s": step,
                            "read_gb_s": 29.0}],
        "decode_batch": [{"batch": b, "context": 16, "tok_s": 90.0 * b, "tok_s_per_request": 90.0, "step_s": step,
                          "read_gb_s": 31.0} for b in (1, 2, 4)],
        "mixed": {"decoders": 3, "long_prompt": 1024, "ttft_s": 12.0,
                  "tpot_before_s": percentiles([0.01, 0.011, 0.012]), "tpot_during_s": percentiles([0.2, 0.25, 0.3]),
                  "window_s": 12.0, "decoded_tokens_in_window": 150, "decode_tok_s_in_window": 12.5,
                  "prompt_tok_s_in_window": 85.3, "total_tok_s_in_window": 97.8},
        "mixed_target": {"tpot_target_ms": 22.0, "alone_tpot_s": 0.011, "decoders": 3, "long_prompt": 1024,
                         "ttft_s": 15.0, "tpot_before_s": percentiles([0.01, 0.011, 0.012]),
                         "tpot_during_s": percentiles([0.04, 0.05, 0.06]), "window_s": 15.0,
                         "decoded_tokens_in_window": 300, "decode_tok_s_in_window": 20.0, "prompt_tok_s_in_window": 68.3,
                         "total_tok_s_in_window": 88.3, "prompt_steps": 64, "prompt_chunks": {"16": 64}},
        "predicted": {"hardware": "this-machine", "calibrated_from": [], "ttft_s": {"64": 0.7, "1024": 14.3},
                      "decode_tok_s": {"64": 778.0, "2048": 700.0},
                      "decode_batch_tok_s": {"1": 100.0, "2": 200.0, "4": 300.0}},
    }
    return {"metrics": {}, "env": {"cpu": "AMD EPYC", "cores": 2, "date": "2026-11-23T13:00:00+00:00",
                                   "commit": "abc", "loadavg": [3.0, 3.0, 3.0], "quick": False},
            "details": {"results": res}}


def test_stalls_count_the_gaps_over_a_second():
    assert stalls([0.01, 1.5, 0.02, 3.25]) == {"n": 2, "s": 4.75}
    assert stalls([0.01, 0.02]) == {"n": 0, "s": 0}
    assert stalls([0.3, 0.6], over=0.5) == {"n": 1, "s": 0.6}


def test_percentiles():
    p = percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["n"] == 100 and p["max"] == 100.0
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "n": 0}


def test_summary_and_render(tmp_path):
    doc = _doc()
    m = summary(doc["details"]["results"])
    assert m["ttft_s_1024"] == 9.0 and m["ttft_shortest_prompt"] == 64 and m["decode_tok_s_b4"] == 360.0
    assert m["mixed_tpot_p50_s"] == 0.25 and m["mixed_tpot_before_p50_s"] == 0.011
    assert m["ttft_measured_over_predicted_longest"] == round(9.0 / 14.3, 3)
    assert m["mixed_target_tpot_ms"] == 22.0 and m["mixed_target_tpot_p50_s"] == 0.05 and m["mixed_target_ttft_s"] == 15.0
    assert m["mixed_target_p99_over_target"] == round(59.8 / 22.0, 3) and "mixed_target_3x_ttft_s" not in m
    files = _plots.render(doc, tmp_path)
    assert [f.name for f in files] == list(_plots.FILES)
    for f in files[:-1]:
        assert f.read_bytes()[:8] == PNG
    md = (tmp_path / "slo.md").read_text()
    assert "| 1024 | 9.000 (8.500-9.500) | 14.300 | 0.63 |" in md
    assert "| 2048 | 80.0 | 700.0 | 29.0 | 0.11 |" in md
    assert "| 4 | 360.0 | 90.0 | 300.0 | 1.20 | 31.0 |" in md
    assert m["decode_measured_over_predicted_b4"] == 1.2
    assert "p50 / p90 / p99 (ms) | 250.0 / 290.0 / 299.0 |" in md
    assert "slo_mixed.png" in md
    assert "| with the target: decoders' TPOT during the prefill, p50 / p90 / p99 (ms) | 50.0 / 58.0 / 59.8 |" in md
    assert "| with the target: prompt chunks (tokens: steps) | 16: 64 |" in md
    del doc["details"]["results"]["mixed_target"]  # a result from before the target: same layout, no target rows
    assert "mixed_target_ttft_s" not in summary(doc["details"]["results"])
    _plots.render(doc, tmp_path)
    assert "with the target" not in (tmp_path / "slo.md").read_text()


def test_slo_quick(tmp_path, run_quick):
    results = H.default_result("slo.json")
    before = results.read_bytes() if results.exists() else None
    doc = run_quick("slo", tmp_path)
    m = doc["metrics"]
    assert m["model"] == "tiny"
    for k in ("ttft_s_shortest", "decode_tok_s_b1", "mixed_ttft_s", "mixed_tpot_p50_s", "mixed_total_tok_s",
              "ttft_measured_over_predicted_longest", "mixed_target_tpot_ms", "mixed_target_ttft_s",
              "mixed_target_tpot_p50_s", "mixed_target_tpot_p99_s"):
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    r = doc["details"]["results"]
    assert [x["prompt"] for x in r["ttft"]] == [16, 32, 48]
    assert all(x["min"] <= x["s"] <= x["max"] for x in r["ttft"])
    assert [x["batch"] for x in r["decode_batch"]] == [1, 2, 4]
    assert r["mixed"]["tpot_during_s"]["n"] > 0 and r["mixed"]["tpot_before_s"]["n"] > 0
    for key, factor in (("mixed_target", 2), ("mixed_target_3x", 3)):
        mt = r[key]
        assert mt["tpot_target_ms"] == pytest.approx(factor * 1e3 * r["mixed"]["tpot_before_s"]["p50"])
        assert mt["tpot_during_s"]["n"] > 0 and sum(int(k) * v for k, v in mt["prompt_chunks"].items()) == mt["long_prompt"]
        assert m[f"{key}_p99_over_target"] > 0
        assert mt["stalls_over_1s"]["n"] >= 0 and mt["stalls_over_1s"]["s"] >= 0
    assert set(r["predicted"]["ttft_s"]) == {"16", "32", "48"}
    assert set(r["predicted"]["decode_batch_tok_s"]) == {"1", "2", "4"}
    for name in _plots.FILES:
        assert (tmp_path / name).is_file(), name
    assert doc["env"]["quick"] is True
    assert results.exists() is (before is not None) and (before is None or results.read_bytes() == before)
