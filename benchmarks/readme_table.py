"""Print the README's Performance table from benchmarks/results/*.json (e2e, peer_llamacpp,
slo, kernels, prefill);
with --write-readme, replace the table in README.md's "Performance" section (between the
`<!-- perf-table -->` markers) with it.

    python -m benchmarks.readme_table [--write-readme]
"""

from __future__ import annotations

import json

from benchmarks._harness import RESULTS_DIR


def _load(name: str) -> dict | None:
    p = RESULTS_DIR / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _env(d: dict) -> str:
    e = d["env"]
    la = e.get("loadavg") or [e.get("loadavg_1m")]
    quick = ", --quick" if e.get("quick") else ""
    return f"{e.get('date', '?')[:16]}, commit {e.get('commit', '?')}, loadavg {la[0]:.1f}{quick}"


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table() -> str:
    rows = ["| benchmark | model | figure | value | run |", "|---|---|---|---:|---|"]
    e2e = _load("e2e")
    if e2e:
        m, d = e2e["metrics"], e2e["details"]
        run = _env(e2e)
        b1 = d["results"]["decode_b1"]
        rows += [
            f"| e2e (`cpu-only`) | {d['model']} FP8 | decode tok/s, batch 1 (min-max) | {_f(m['decode_tok_s_b1'], 2)} "
            f"({_f(b1['tok_s_min'], 2)}-{_f(b1['tok_s_max'], 2)}) | {run} |",
            f"| e2e | {d['model']} FP8 | decode, fraction of the bandwidth bound, batch 1 | "
            f"{_f(m['decode_frac_of_read_b1'], 3)} | bound {_f(m['decode_bound_tok_s_b1'], 1)} tok/s at read pass "
            f"{_f(m['read_gb_s'], 1)} GB/s, {m['bytes_per_token'] / 1e9:.2f} GB/token |",
            f"| e2e | {d['model']} FP8 | decode tok/s, batch 4 (4 requests) | {_f(m['decode_tok_s_b4'], 2)} | {run} |",
            f"| e2e | {d['model']} FP8 | prefill tok/s, 512-token prompt | {_f(m['prefill_tok_s_512'])} | {run} |",
            f"| e2e | {d['model']} FP8 | prefill tok/s, 4096-token prompt | {_f(m.get('prefill_tok_s_4096'))} | {run} |",
        ]
    rows += _peer_rows() + _slo_rows()
    k = _load("kernels")
    if k:
        m, run = k["metrics"], _env(k)
        rows += [
            f"| kernels | V3 expert shapes, FP8 | GEMV M=1, fraction of the read pass | {_f(m['fp8_gemv_m1_frac_of_read'], 3)} | "
            f"{_f(m['fp8_gemv_m1_gbps'])} GB/s vs read pass {_f(m['read_pass_gbps'])} GB/s; {run} |",
            f"| kernels | V3 expert shapes, FP8 | MoE layer (8 experts, 1 token) ms, fraction of read | "
            f"{_f(m['moe_layer_m1_ms'], 2)} ms, {_f(m['moe_layer_m1_frac_of_read'], 3)} | {run} |",
        ]
        if "int4_gemv_m1_frac_of_read" in m:
            rows.append(f"| kernels | V3 expert shapes, INT4 g32 | GEMV M=1, fraction of the read pass; speedup vs FP8 | "
                        f"{_f(m['int4_gemv_m1_frac_of_read'], 3)}; {_f(m['int4_gemv_m1_speedup_vs_fp8'], 2)}x | {run} |")
    k4 = _load("kernels_int4_gemm")
    if k4:
        m = k4["metrics"]
        rows.append(f"| kernels | V3 expert shapes, INT4 g32 | fused MoE, 512 tokens (prefill): GFLOP/s; speedup vs FP8 GEMM | "
                    f"{_f(m['int4_moe_t512_gemm_gflops'])}; {_f(m['int4_moe_t512_speedup_vs_fp8_gemm'], 2)}x | {_env(k4)} |")
    q = _load("quality")
    if q:
        m, d = q["metrics"], q["details"]
        rows.append(f"| quality | {d['model']} (random weights) | INT4 ({d['int4_scale_rule']}) vs the f32 forward: KL nats; "
                    f"top-1 agreement | {_f(m['int4_cpu_kl_mean'], 3)}; {_f(m['int4_cpu_top1_agree'], 3)} | "
                    f"CPU FP8: KL {m['fp8_cpu_kl_mean']:.0e}; {_env(q)} |")
    p = _load("prefill")
    if p:
        m, d, run = p["metrics"], p["details"], _env(p)
        top = max(d["lengths"])
        for s in ("resident", "cpu-experts", "slp", "dslp"):
            if f"{s}_tok_s" in m:
                rows.append(f"| prefill ({s}) | {d['model']} FP8 | prefill tok/s, {top}-token prompt | "
                            f"{_f(m[f'{s}_tok_s'])} | {run} |")
    return "\n".join(rows)


def _peer_rows() -> list[str]:
    """jaxmoe vs llama.cpp on the same model, threads and run (benchmarks/peer_llamacpp.py)."""
    d = _load("peer_llamacpp")
    if not d:
        return []
    m, det, run = d["metrics"], d["details"], _env(d)
    n = det["n_prompt"]
    what = f"{det['model']}, {m['threads']} threads, {det['rounds']} alternating rounds"
    rows = [f"| peer | {what} | jaxmoe (FP8) decode / prefill {n} tok/s | {_f(m['jaxmoe_decode_tok_s'], 2)} / "
            f"{_f(m[f'jaxmoe_prefill{n}_tok_s'], 1)} | {run} |"]
    if m.get("peer_skipped"):
        return rows + [f"| peer | {what} | llama.cpp | skipped | {m['peer_skipped']} |"]
    for t in ("q8_0", "bf16"):
        if m.get(f"llamacpp_{t}_decode_tok_s") is None:
            continue
        rows += [f"| peer | {what} | llama.cpp {t} decode / prefill {n} tok/s | {_f(m[f'llamacpp_{t}_decode_tok_s'], 2)} / "
                 f"{_f(m[f'llamacpp_{t}_prefill{n}_tok_s'], 1)} | llama-bench tg{det['llama_bench']['n_gen']} / pp{n}; {run} |",
                 f"| peer | {what} | ratio jaxmoe / llama.cpp {t}: decode, prefill {n} | "
                 f"{_f(m[f'ratio_decode_vs_{t}'], 2)}, {_f(m[f'ratio_prefill{n}_vs_{t}'], 2)} | "
                 + ("target vs q8_0: decode >= 1.3, prefill >= 1.0 | " if t == "q8_0" else "| ")]
    return rows


def _slo_rows() -> list[str]:
    """Headline figures of the SLO report (benchmarks/slo.py; plots in results/slo.md)."""
    d = _load("slo")
    if not d:
        return []
    m, run = d["metrics"], _env(d)
    longest = max(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("ttft_s_") and k != "ttft_s_shortest")
    ctx = max(int(k.rsplit("ctx", 1)[1]) for k in m if k.startswith("decode_tok_s_ctx"))
    bmax = max(int(k.rsplit("_b", 1)[1]) for k in m if k.startswith("decode_tok_s_b"))
    model = f"{m['model']} FP8"
    return [
        f"| SLO (`cpu-only`) | {model} | TTFT s, {m['ttft_shortest_prompt']} / {longest}-token prompt (measured / "
        f"predicted at {longest}) | {_f(m['ttft_s_shortest'], 3)} / {_f(m[f'ttft_s_{longest}'], 2)} "
        f"({_f(m['ttft_measured_over_predicted_longest'], 2)}) | [slo.md](benchmarks/results/slo.md); {run} |",
        f"| SLO | {model} | decode tok/s: batch 1 / batch {bmax} / batch 1 at context {ctx} | "
        f"{_f(m['decode_tok_s_b1'], 1)} / {_f(m[f'decode_tok_s_b{bmax}'], 1)} / {_f(m[f'decode_tok_s_ctx{ctx}'], 1)} | {run} |",
        f"| SLO | {model} | mixed: {m['mixed_decoders']} decoders + a {m['mixed_long_prompt']}-token prompt: its TTFT s; "
        f"decoders' TPOT p50 / p99 ms (p50 alone) | {_f(m['mixed_ttft_s'], 2)}; {_f(1e3 * m['mixed_tpot_p50_s'], 1)} / "
        f"{_f(1e3 * m['mixed_tpot_p99_s'], 1)} ({_f(1e3 * m['mixed_tpot_before_p50_s'], 1)}) | {run} |",
    ]


def write_readme() -> None:
    readme = RESULTS_DIR.parents[1] / "README.md"
    text = readme.read_text()
    start, end = "<!-- perf-table -->", "<!-- /perf-table -->"
    i, j = text.index(start) + len(start), text.index(end)
    readme.write_text(text[:i] + "\n" + table() + "\n" + text[j:])


if __name__ == "__main__":
    import sys

    if "--write-readme" in sys.argv[1:]:
        write_readme()
    print(table())
