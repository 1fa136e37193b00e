"""benchmarks/readme_table.py: one row block per CPU class from the results JSONs (results
whose env has no cpu_class count as AVX2), newest run per class and benchmark, kernel paths and
precisions in the kernel rows, llama-bench's workaround in the peer rows. No benchmark runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import readme_table as RT  # noqa: E402


def _kernels(env: dict, bf16: bool) -> dict:
    m = {"fp8_gemv_m1_frac_of_read": 0.9, "fp8_gemv_m1_gbps": 27.0, "read_pass_gbps": 30.0, "moe_layer_m1_ms": 12.0,
         "moe_layer_m1_frac_of_read": 0.88, "fp8_gemv_m1_subnormal_heavy_slowdown": 14.2,
         "fp8_gemv_m1_subnormal_heavy_frac_of_read": 0.06}
    if bf16:
        m.update({f"{k}_bf16": v for k, v in m.items()})
    paths = {"exact": {"kernel_path": "avx512"}, "bf16": {"kernel_path": "avx512-bf16"}} if bf16 else None
    return {"metrics": m, "env": {**env, **({"kernel_paths": paths} if paths else {})},
            "details": {"weights": {"uniform_codes": {"subnormal_frac": 0.0547}}}}


def _peer(env: dict, workaround: str | None) -> dict:
    m = {"jaxmoe_decode_tok_s": 9.0, "jaxmoe_prefill512_tok_s": 40.0, "threads": 2, "peer_skipped": None,
         "llamacpp_q8_0_decode_tok_s": 6.7, "llamacpp_q8_0_prefill512_tok_s": 44.6, "ratio_decode_vs_q8_0": 1.34,
         "ratio_prefill512_vs_q8_0": 0.9}
    return {"metrics": m, "env": env, "details": {"model": "bench-v3-mid", "n_prompt": 512, "rounds": 3,
                                                  "llama_bench": {"n_gen": 32}, "llama_bench_workaround": workaround}}


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_blocks_per_cpu_class(tmp_path):
    legacy = {"date": "2026-11-23T14:57:24+00:00", "cpu": "AMD EPYC", "cores": 2, "isa": "avx2", "loadavg_1m": 1.8,
              "commit": "490105e"}
    amx = {"date": "2026-12-04T10:00:00+00:00", "cpu": "Intel(R) Xeon(R) Platinum 8480+", "cores": 2,
           "cpu_class": "avx512+amx", "cpu_flags": ["avx512f", "avx512_bf16", "amx_tile"], "loadavg_1m": 0.5,
           "commit": "abc1234"}
    _write(tmp_path / "kernels.json", _kernels(legacy, bf16=False))  # no env.cpu_class: AVX2
    _write(tmp_path / "avx512-amx" / "kernels.json", _kernels(amx, bf16=True))
    _write(tmp_path / "avx512-amx" / "peer_llamacpp.json", _peer(amx, "--repack 0 (AMX repack abort)"))
    older = {**amx, "date": "2026-12-01T00:00:00+00:00"}
    _write(tmp_path / "peer_llamacpp.json", _peer(older, None))  # same class, older: not shown

    runs = RT.collect(tmp_path)
    assert list(runs) == ["avx2", "avx512+amx"] and set(runs["avx512+amx"]) == {"kernels", "peer_llamacpp"}
    assert runs["avx512+amx"]["peer_llamacpp"]["env"]["date"] == amx["date"]

    lines = RT.table(tmp_path).splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("| **")]
    assert [lines[i].split("|")[1].strip() for i in heads] == ["**AVX2 CPU**", "**AVX-512+AMX CPU**"]
    assert "AMD EPYC" in lines[heads[0]] and "Intel(R) Xeon(R) Platinum 8480+" in lines[heads[1]]
    assert "(avx512f avx512_bf16 amx_tile)" in lines[heads[1]] and "2 cores" in lines[heads[1]]
    avx2, amx_rows = lines[heads[0] + 1:heads[1]], lines[heads[1] + 1:]
    assert any("FP8 (avx2)" in r and "| 0.900 |" in r for r in avx2)  # no kernel path recorded: its ISA
    assert not any("bf16" in r for r in avx2)
    assert any("FP8 (avx512)" in r and "GEMV M=1, fraction" in r for r in amx_rows)
    assert any("FP8 (avx512-bf16, bf16 dot)" in r and "MoE layer" in r for r in amx_rows)
    assert any("subnormal-heavy codes (5.5 % subnormal)" in r and "14.20x" in r for r in amx_rows)
    assert any("llama.cpp q8_0" in r and "--repack 0 (AMX repack abort)" in r for r in amx_rows)
    assert all(line.count("|") == 6 for line in lines), [x for x in lines if x.count("|") != 6]


def test_committed_results_render():
    """The repository's own results: an AVX2 block first, with the committed kernel figures."""
    text = RT.table()
    lines = text.splitlines()
    if len(lines) > 2:
        assert lines[2].startswith("| **") and RT.cpu_class_of({"env": {}}) == "avx2"
    kernels = RT.RESULTS_DIR / "kernels.json"
    if kernels.is_file():
        m = json.loads(kernels.read_text())["metrics"]
        assert f"{m['fp8_gemv_m1_frac_of_read']:.3f}" in text


def test_prefix_rows(tmp_path):
    """benchmarks.prefix: one row per workload measured, its ratios and tokens computed."""
    env = {"date": "2026-12-05T01:00:00+00:00", "cpu": "AMD EPYC", "cores": 2, "cpu_class": "avx2", "loadavg_1m": 1.0,
           "commit": "abc1234"}
    m = {"model": "bench-v3-mid", "target_ttft_ratio": 0.15, "chat_ttft_ratios": [0.12, 0.1],
         "chat_prefill_tokens_computed_cached": 1500, "chat_prefill_tokens_computed_uncached": 7750, "chat_same_tokens": True}
    _write(tmp_path / "prefix.json", {"metrics": m, "env": env, "details": {}})
    rows = [r for r in RT.table(tmp_path).splitlines() if r.startswith("| prefix")]
    assert len(rows) == 1 and "chat turns" in rows[0] and "| 0.120, 0.100 |" in rows[0] and "1500 vs 7750" in rows[0]
    assert rows[0].count("|") == 6


def test_qwen3_peer_rows_beside_deepseeks(tmp_path):
    """`peer_llamacpp --config qwen3-moe-mid` writes its own file; its rows follow DeepSeek-V3's."""
    from benchmarks.peer_llamacpp import result_name

    assert result_name("bench-v3-mid") == "peer_llamacpp" and result_name("qwen3-moe-mid") == RT.PEER_QWEN3
    env = {"date": "2026-12-05T04:00:00+00:00", "cpu": "AMD EPYC", "cores": 2, "cpu_class": "avx2", "loadavg_1m": 2.0,
           "commit": "abc1234"}
    qwen = _peer(env, None)
    qwen["details"]["model"] = "qwen3-moe-mid"
    _write(tmp_path / "peer_llamacpp.json", _peer(env, None))
    _write(tmp_path / f"{RT.PEER_QWEN3}.json", qwen)
    rows = [r for r in RT.table(tmp_path).splitlines() if r.startswith("| peer |")]
    models = [r.split("|")[2].strip().split(",")[0] for r in rows]
    assert models == ["bench-v3-mid"] * 3 + ["qwen3-moe-mid"] * 3
    assert any("qwen3-moe-mid" in r and "ratio jaxmoe / llama.cpp q8_0" in r and "| 1.34, 0.90 |" in r for r in rows)
