"""Print the README's Performance table from the results JSONs (e2e, peer_llamacpp, slo, serve,
load, prefix, kernels, kernels_int4_gemm, quality, prefill), one row block per CPU class measured;
with --write-readme, replace the table in README.md's "Performance" section (between the
`<!-- perf-table -->` markers) with it.

    python -m benchmarks.readme_table [--write-readme]

Where results come from: `benchmarks/results/<name>.json` (what a full run writes) and
`benchmarks/results/<class dir>/<name>.json` for runs kept from other CPUs (class dirs
"avx2", "avx512", "avx512-amx": copy a run's JSON there, or pass it as `--json`). A result's
CPU class is its env's `cpu_class` (benchmarks/_cpu.py); a result whose env has none comes
from the AVX2 development box and counts as "avx2". Per class and benchmark the
newest run (env date) is shown. Blocks go AVX2, AVX-512, AVX-512+AMX; each opens with a
row naming the class and its CPU model(s).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from benchmarks._cpu import CLASSES
from benchmarks._harness import CLASS_DIRS, RESULTS_DIR
from benchmarks.peer_llamacpp import result_name
from benchmarks.slo import TARGETS as SLO_TARGETS

PEER_QWEN3 = result_name("qwen3-moe-mid")  # benchmarks.peer_llamacpp --config qwen3-moe-mid
NAMES = ("e2e", "peer_llamacpp", PEER_QWEN3, "slo", "serve", "load", "prefix", "kernels", "kernels_int4_gemm", "quality",
         "prefill")
CLASS_LABELS = {"avx2": "AVX2", "avx512": "AVX-512", "avx512+amx": "AVX-512+AMX", "other": "other"}
LEGACY_CLASS = "avx2"  # results whose env has no cpu_class: all from the AVX2 development box

Loader = Callable[[str], "dict | None"]


def cpu_class_of(doc: dict) -> str:
    """The CPU class a result was measured on (env.cpu_class, else LEGACY_CLASS)."""
    return doc.get("env", {}).get("cpu_class") or LEGACY_CLASS


def collect(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, dict]]:
    """{cpu class: {benchmark name: newest result}} from results_dir and its class dirs,
    classes in CLASSES order (then any other)."""
    found: dict[str, dict[str, dict]] = {}
    for d in [results_dir] + [results_dir / c for c in CLASS_DIRS.values()]:
        for name in NAMES:
            p = d / f"{name}.json"
            if not p.is_file():
                continue
            doc = json.loads(p.read_text())
            cls = cpu_class_of(doc)
            old = found.setdefault(cls, {}).get(name)
            if old is None or doc.get("env", {}).get("date", "") > old.get("env", {}).get("date", ""):
                found[cls][name] = doc
    order = [c for c in CLASSES if c in found] + sorted(c for c in found if c not in CLASSES)
    return {c: found[c] for c in order}


def _env(d: dict) -> str:
    e = d["env"]
    la = e.get("loadavg") or [e.get("loadavg_1m")]
    quick = ", --quick" if e.get("quick") else ""
    return f"{e.get('date', '?')[:16]}, commit {e.get('commit', '?')}, loadavg {la[0]:.1f}{quick}"


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(results_dir: Path = RESULTS_DIR) -> str:
    """The markdown table: a header, then per CPU class a naming row and its benchmark rows."""
    rows = ["| benchmark | model | figure | value | run |", "|---|---|---|---:|---|"]
    for cls, docs in collect(results_dir).items():
        cpus = sorted({d["env"].get("cpu", "?") for d in docs.values()})
        cores = sorted({str(d["env"]["cores"]) for d in docs.values() if d["env"].get("cores")})
        flags = next((d["env"]["cpu_flags"] for d in docs.values() if d["env"].get("cpu_flags")), None)
        rows.append(f"| **{CLASS_LABELS.get(cls, cls)} CPU** | {', '.join(cpus)} | the rows below ran on this CPU class"
                    f"{' (' + ' '.join(flags) + ')' if flags else ''} | | {'/'.join(cores) or '?'} cores |")
        rows += _rows(docs.get)
    return "\n".join(rows)


def _rows(load: Loader) -> list[str]:
    """The benchmark rows of one CPU class; load(name) gives its result or None."""
    rows: list[str] = []
    e2e = load("e2e")
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
    rows += _peer_rows(load) + _peer_rows(load, PEER_QWEN3) + _slo_rows(load) + _serve_rows(load) + _load_rows(load)
    rows += _prefix_rows(load) + _kernel_rows(load)
    k = load("kernels")
    if k:
        m, run = k["metrics"], _env(k)
        if "int4_gemv_m1_frac_of_read" in m:
            rows.append(f"| kernels | V3 expert shapes, INT4 g32 | GEMV M=1, fraction of the read pass; speedup vs FP8 | "
                        f"{_f(m['int4_gemv_m1_frac_of_read'], 3)}; {_f(m['int4_gemv_m1_speedup_vs_fp8'], 2)}x | {run} |")
    k4 = load("kernels_int4_gemm")
    if k4:
        m = k4["metrics"]
        rows.append(f"| kernels | V3 expert shapes, INT4 g32 | fused MoE, 512 tokens (prefill): GFLOP/s; speedup vs FP8 GEMM | "
                    f"{_f(m['int4_moe_t512_gemm_gflops'])}; {_f(m['int4_moe_t512_speedup_vs_fp8_gemm'], 2)}x | {_env(k4)} |")
    q = load("quality")
    if q:
        m, d = q["metrics"], q["details"]
        rows.append(f"| quality | {d['model']} (random weights) | INT4 ({d['int4_scale_rule']}) vs the f32 forward: KL nats; "
                    f"top-1 agreement | {_f(m['int4_cpu_kl_mean'], 3)}; {_f(m['int4_cpu_top1_agree'], 3)} | "
                    f"CPU FP8: KL {m['fp8_cpu_kl_mean']:.0e}; {_env(q)} |")
    p = load("prefill")
    if p:
        m, d, run = p["metrics"], p["details"], _env(p)
        top = max(d["lengths"])
        for s in ("resident", "cpu-experts", "slp", "dslp"):
            if f"{s}_tok_s" in m:
                rows.append(f"| prefill ({s}) | {d['model']} FP8 | prefill tok/s, {top}-token prompt | "
                            f"{_f(m[f'{s}_tok_s'])} | {run} |")
    return rows


def _kernel_path(doc: dict, prec: str) -> str:
    """The kernel path a kernels.json ran at precision `prec` ("exact" | "bf16"); its ISA for
    a result that records no kernel path."""
    env = doc["env"]
    paths = env.get("kernel_paths") or {}
    info = paths.get(prec) or (paths.get("default") if prec == "exact" else None) or {}
    return info.get("kernel_path") or env.get("isa") or "?"


def _kernel_rows(load: Loader) -> list[str]:
    """FP8 GEMV and MoE-layer rows of kernels.json, per precision measured (exact: plain
    metric keys, bf16: `_bf16` keys), each naming its kernel path; the subnormal-heavy row."""
    k = load("kernels")
    if not k:
        return []
    m, run, rows = k["metrics"], _env(k), []
    for prec, sfx in (("exact", ""), ("bf16", "_bf16")):
        if f"fp8_gemv_m1_frac_of_read{sfx}" not in m:
            continue
        what = f"V3 expert shapes, FP8 ({_kernel_path(k, prec)}{', bf16 dot' if sfx else ''})"
        rows += [
            f"| kernels | {what} | GEMV M=1, fraction of the read pass | {_f(m[f'fp8_gemv_m1_frac_of_read{sfx}'], 3)} | "
            f"{_f(m[f'fp8_gemv_m1_gbps{sfx}'])} GB/s vs read pass {_f(m[f'read_pass_gbps{sfx}'])} GB/s; {run} |",
            f"| kernels | {what} | MoE layer (8 experts, 1 token) ms, fraction of read | "
            f"{_f(m[f'moe_layer_m1_ms{sfx}'], 2)} ms, {_f(m[f'moe_layer_m1_frac_of_read{sfx}'], 3)} | {run} |",
        ]
        if f"fp8_gemv_m1_subnormal_heavy_slowdown{sfx}" in m:
            sub = k["details"].get("weights", {}).get("uniform_codes", {}).get("subnormal_frac")
            rows.append(f"| kernels | {what} | GEMV M=1 on subnormal-heavy codes ({_f(None if sub is None else 100 * sub)} % "
                        f"subnormal): slowdown vs checkpoint-like | {_f(m[f'fp8_gemv_m1_subnormal_heavy_slowdown{sfx}'], 2)}x | "
                        f"{run} |")
    return rows


def _peer_rows(load: Loader, name: str = "peer_llamacpp") -> list[str]:
    """jaxmoe vs llama.cpp on the same model, threads and run (benchmarks/peer_llamacpp.py)."""
    d = load(name)
    if not d:
        return []
    m, det, run = d["metrics"], d["details"], _env(d)
    n = det["n_prompt"]
    wa = det.get("llama_bench_workaround")
    bench = f"llama-bench tg{det['llama_bench']['n_gen']} / pp{n}" + (f", {wa}" if wa else "")
    what = f"{det['model']}, {m['threads']} threads, {det['rounds']} alternating rounds"
    rows = [f"| peer | {what} | jaxmoe (FP8) decode / prefill {n} tok/s | {_f(m['jaxmoe_decode_tok_s'], 2)} / "
            f"{_f(m[f'jaxmoe_prefill{n}_tok_s'], 1)} | {run} |"]
    if m.get("peer_skipped"):
        return rows + [f"| peer | {what} | llama.cpp | skipped | {m['peer_skipped']} |"]
    for t in ("q8_0", "bf16"):
        if m.get(f"llamacpp_{t}_decode_tok_s") is None:
            continue
        rows += [f"| peer | {what} | llama.cpp {t} decode / prefill {n} tok/s | {_f(m[f'llamacpp_{t}_decode_tok_s'], 2)} / "
                 f"{_f(m[f'llamacpp_{t}_prefill{n}_tok_s'], 1)} | {bench}; {run} |",
                 f"| peer | {what} | ratio jaxmoe / llama.cpp {t}: decode, prefill {n} | "
                 f"{_f(m[f'ratio_decode_vs_{t}'], 2)}, {_f(m[f'ratio_prefill{n}_vs_{t}'], 2)} | "
                 + ("target vs q8_0: decode >= 1.3, prefill >= 1.0 | " if t == "q8_0" else "| ")]
    return rows


def _slo_rows(load: Loader) -> list[str]:
    """Headline figures of the SLO report (benchmarks/slo.py; plots in results/slo.md)."""
    d = load("slo")
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
    ] + [
        f"| SLO | {model} | the same under `tpot_target_ms` = {x} the TPOT alone ({_f(m[f'{key}_tpot_ms'], 1)} ms): TTFT s; "
        f"decoders' TPOT p50 / p99 ms (p99 / target) | {_f(m[f'{key}_ttft_s'], 2)}; {_f(1e3 * m[f'{key}_tpot_p50_s'], 1)} / "
        f"{_f(1e3 * m[f'{key}_tpot_p99_s'], 1)} ({_f(m[f'{key}_p99_over_target'], 2)}) | {run} |"
        for key, x in ((k, f"{f:g}x") for k, f in SLO_TARGETS.items()) if f"{key}_p99_over_target" in m
    ]


def _serve_rows(load: Loader) -> list[str]:
    """The load test of `jaxmoe serve` (benchmarks/serve.py): N concurrent streaming clients
    over HTTP; TTFT / TPOT at the fewest and most clients, output tok/s at every N."""
    d = load("serve")
    if not d:
        return []
    m, run = d["metrics"], _env(d)
    ns = m["clients"]
    lo, hi = min(ns), max(ns)
    model = f"{m['model']} FP8"
    what = f"{m['prompt_tokens']}-token prompt, {m['max_tokens']} output tokens, {m.get('n_slots') or '?'} slots"

    def ms(key: str) -> str:
        return _f(None if m.get(key) is None else 1e3 * m[key], 1)

    frac = m.get("decode_frac_of_read_c1")
    return [
        f"| serve (`jaxmoe serve`, streamed /v1/completions) | {model} | TTFT ms p50 / p99: {lo} / {hi} clients ({what}) | "
        f"{ms(f'ttft_p50_s_c{lo}')} / {ms(f'ttft_p99_s_c{lo}')}; {ms(f'ttft_p50_s_c{hi}')} / {ms(f'ttft_p99_s_c{hi}')} | "
        f"{run} |",
        f"| serve | {model} | TPOT ms p50 / p99: {lo} / {hi} clients | {ms(f'tpot_p50_s_c{lo}')} / {ms(f'tpot_p99_s_c{lo}')}; "
        f"{ms(f'tpot_p50_s_c{hi}')} / {ms(f'tpot_p99_s_c{hi}')} | "
        + (f"decode at 1 client: {_f(frac, 3)} of the bandwidth bound; " if frac is not None else "") + f"{run} |",
        f"| serve | {model} | output tok/s at {' / '.join(str(n) for n in ns)} clients | "
        f"{' / '.join(_f(m.get(f'output_tok_s_c{n}')) for n in ns)} | read pass {_f(m.get('read_gb_s'))} GB/s; "
        f"bench-v3-mid: `python -m benchmarks.serve --model bench-v3-mid`; {run} |",
    ]


def _load_rows(load: Loader) -> list[str]:
    """`jaxmoe.load` GB/s against a read-only pass over the checkpoint's files (benchmarks/load.py)."""
    d = load("load")
    if not d:
        return []
    m, run = d["metrics"], _env(d)
    model = f"{m['model']} FP8, {m['checkpoint_bytes'] / 1e9:.1f} GB"
    cold = (f"{_f(m['load_cold_gb_s'], 2)} GB/s, {_f(m['load_cold_frac_of_read'], 2)} of read pass "
            f"{_f(m['read_cold_gb_s'], 2)} GB/s" if m.get("cold_effective") else "page cache drop not effective here")
    cached = (f"; weights cache {_f(m['cached_load_gb_s'], 2)} GB/s ({_f(m['cached_frac_of_read'], 2)})"
              if m.get("cached_load_gb_s") else "")
    return [f"| load (`jaxmoe.load`, `cpu-only`) | {model} | GB/s warm (first load); fraction of the read pass | "
            f"{_f(m['load_warm_gb_s'], 2)} ({_f(m['load_first_gb_s'], 2)}); {_f(m['load_warm_frac_of_read'], 2)} | "
            f"read pass {_f(m['read_warm_gb_s'], 2)} GB/s; cold: {cold}{cached}; {run} |"]


def _prefix_rows(load: Loader) -> list[str]:
    """Prefix caching (benchmarks/prefix.py): TTFT with the prefix cache over TTFT without, per
    turn / call from the second on, and the prefill tokens each engine computed."""
    d = load("prefix")
    if not d:
        return []
    m, run = d["metrics"], _env(d)
    rows = []
    for w, what in (("chat", "chat turns resending their history"), ("agent", "agent calls sharing a prefix")):
        if f"{w}_ttft_ratios" not in m:
            continue
        rows.append(f"| prefix (`cpu-only`) | {m['model']} FP8 | {what}: TTFT cached / uncached from the 2nd on "
                    f"(target <= {m['target_ttft_ratio']}) | {', '.join(_f(x, 3) for x in m[f'{w}_ttft_ratios'])} | "
                    f"prefill tokens computed {m[f'{w}_prefill_tokens_computed_cached']} vs "
                    f"{m[f'{w}_prefill_tokens_computed_uncached']}; same tokens: {m[f'{w}_same_tokens']}; {run} |")
    return rows


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
