"""benchmarks/serve.py: `--quick` starts `jaxmoe serve` on the tiny model, runs 1 and 2
streaming clients through the openai package and writes {metrics, env, details} and the plot;
the README rows come from that JSON. Layout only: no timing assertions (the machine is shared)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import readme_table as RT  # noqa: E402
from benchmarks.serve import percentiles  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_percentiles():
    p = percentiles([float(i) for i in range(1, 101)])
    assert math.isclose(p["p50"], 50.5) and math.isclose(p["p99"], 99.01) and p["n"] == 100 and p["max"] == 100.0
    assert percentiles([])["p50"] is None and percentiles([])["n"] == 0


def test_serve_quick(tmp_path, run_quick):
    committed = sorted((ROOT / "benchmarks" / "results").rglob("serve*.json"))
    before = {p: p.read_bytes() for p in committed}
    doc = run_quick("serve", tmp_path, timeout=240, cache_dir=tmp_path / "cache")
    m, r = doc["metrics"], doc["details"]["results"]
    assert m["model"] == "tiny" and m["clients"] == [1, 2] and m["failed_requests"] == 0
    assert m["max_tokens"] == 8 and m["prompt_tokens"] == 16 and m["n_slots"] >= 1
    for n in (1, 2):
        for k in (f"ttft_p50_s_c{n}", f"ttft_p99_s_c{n}", f"tpot_p50_s_c{n}", f"tpot_p99_s_c{n}", f"output_tok_s_c{n}",
                  f"read_gb_s_c{n}"):
            assert isinstance(m[k], (int, float)) and math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    assert m["read_gb_s"] > 0 and m["decode_frac_of_read_c1"] > 0
    warm = [x["clients"] for x in r["warmup"]]  # at every N until a round compiles nothing
    assert set(warm) == {1, 2} and warm == sorted(warm) and all(x["failed"] == 0 for x in r["warmup"])
    assert all(isinstance(x["compiles"], int) for x in r["warmup"]) and r["warmup_compiles"] >= 1
    assert [x["clients"] for x in r["rounds"]] == [1, 2]
    for rnd in r["rounds"]:
        reqs = rnd["per_request"]
        assert len(reqs) == rnd["requests"] == rnd["clients"] * rnd["requests_per_client"] and rnd["failed"] == 0
        assert {q["client"] for q in reqs} == set(range(rnd["clients"]))
        for q in reqs:  # ignore_eos: every request generates max_tokens, reported in the usage chunk
            assert q["completion_tokens"] == 8 and q["finish_reason"] == "length" and q["usage_reported"], q
            assert q["ttft_s"] > 0 and q["tpot_s"] > 0
        assert rnd["ttft_s"]["n"] == rnd["tpot_s"]["n"] == rnd["requests"]
        assert rnd["completion_tokens"] == 8 * rnd["requests"] and rnd["read_pass"]["gb_s"] > 0
        assert isinstance(rnd["server_compiles"], int) and rnd["cpu_s"]["clients"] >= 0
    assert r["server_exit_code"] == 0 and "jaxmoe serve:" in r["server_log_tail"]
    assert doc["env"]["quick"] is True and doc["env"]["cpu_class"]
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG
    # --quick never touches the committed results
    assert sorted((ROOT / "benchmarks" / "results").rglob("serve*.json")) == committed
    assert all(p.read_bytes() == b for p, b in before.items())

    # the README rows of this result: three serve rows under its CPU class, six cells each
    results = tmp_path / "results"
    (results / "avx512").mkdir(parents=True)
    (results / "avx512" / "serve.json").write_text((tmp_path / "serve.json").read_text())
    lines = RT.table(results).splitlines()
    rows = [line for line in lines if line.startswith("| serve")]
    assert len(rows) == 3 and all(line.count("|") == 6 for line in lines), lines
    assert "TTFT ms p50 / p99: 1 / 2 clients" in rows[0] and "output tok/s at 1 / 2 clients" in rows[2]
    assert "--model bench-v3-mid" in rows[2]
