"""Plots and the markdown table of the SLO report (benchmarks/slo.py), from its JSON document
alone: measuring and drawing stay apart (`python -m benchmarks.slo --render slo.json`).

Files: slo_ttft.png (TTFT vs prompt length, measured and predicted), slo_decode_context.png
(decode tok/s vs context, measured and predicted), slo_decode_batch.png (decode tok/s vs
batch), slo_mixed.png (the decoders' time per output token before and during a long
prefill, and during it under `tpot_target_ms` where measured) and slo.md.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FILES = ("slo_ttft.png", "slo_decode_context.png", "slo_decode_batch.png", "slo_mixed.png", "slo.md")


def _title(doc: dict, what: str) -> str:
    r, e = doc["details"]["results"], doc["env"]
    return f"{what}\n{r['model']} FP8, cpu-only, {e.get('cpu', '?')} x{e.get('cores', '?')} ({e.get('date', '')[:10]})"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pred(d: dict) -> dict[int, float]:
    return {int(k): v for k, v in d.items()}  # JSON turned the int keys into strings


def _measured_vs_predicted(doc: dict, path: Path, x, y, lo, hi, label: str, predicted: dict, xlabel: str,
                           ylabel: str, title: str) -> Path:
    """A log-log plot of a measured curve (median with min-max bars) and the planner's prediction."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(x, y, yerr=[[max(0.0, m - a) for m, a in zip(y, lo)], [max(0.0, b - m) for m, b in zip(y, hi)]],
                marker="o", capsize=3, label=label)
    p = _pred(predicted)
    ax.plot(sorted(p), [p[k] for k in sorted(p)], "--", marker="x",
            label=f"predicted ({doc['details']['results']['predicted']['hardware']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_title(doc, title), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ttft(doc: dict, path: Path) -> Path:
    r = doc["details"]["results"]
    t = r["ttft"]
    return _measured_vs_predicted(doc, path, [x["prompt"] for x in t], [x["s"] for x in t], [x["min"] for x in t],
                                  [x["max"] for x in t], "measured (median, min-max)", r["predicted"]["ttft_s"],
                                  "prompt tokens", "time to first token (s)", "TTFT vs prompt length")


def plot_decode_context(doc: dict, path: Path) -> Path:
    r = doc["details"]["results"]
    d = r["decode_context"]
    return _measured_vs_predicted(doc, path, [x["context"] for x in d], [x["tok_s"] for x in d],
                                  [1 / x["step_s"]["max"] for x in d], [1 / x["step_s"]["min"] for x in d],
                                  "measured, batch 1 (median, min-max)", r["predicted"]["decode_tok_s"],
                                  "context tokens", "decode tok/s", "Decode vs context length")


def plot_decode_batch(doc: dict, path: Path) -> Path:
    r = doc["details"]["results"]
    b = [x["batch"] for x in r["decode_batch"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [x["tok_s"] for x in r["decode_batch"]], marker="o", label="total tok/s")
    ax.plot(b, [x["tok_s_per_request"] for x in r["decode_batch"]], marker="s", label="tok/s per request")
    pb = _pred(r["predicted"].get("decode_batch_tok_s", {}))
    if pb:
        ax.plot(sorted(pb), [pb[k] for k in sorted(pb)], "--", marker="x",
                label=f"total tok/s predicted ({r['predicted']['hardware']})")
    ax.set_xticks(b)
    ax.set_xlabel("concurrent requests (batch)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(doc, "Decode vs batch size"), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mixed(doc: dict, path: Path) -> Path:
    m = doc["details"]["results"]["mixed"]
    keys = ("p50", "p90", "p99")
    before = [1e3 * (m["tpot_before_s"][k] or 0) for k in keys]
    during = [1e3 * (m["tpot_during_s"][k] or 0) for k in keys]
    mt = doc["details"]["results"].get("mixed_target")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(keys))
    bw = 0.27 if mt else 0.4
    ax.bar([i - bw / (1 if mt else 2) for i in x], before, bw, label="decoders alone")
    ax.bar([i + (0 if mt else bw / 2) for i in x], during, bw, label=f"while a {m['long_prompt']}-token prompt prefills")
    title = f"Mixed load: {m['decoders']} decoders, long prompt TTFT {m['ttft_s']:.2f} s"
    if mt:
        target = [1e3 * (mt["tpot_during_s"][k] or 0) for k in keys]
        ax.bar([i + bw for i in x], target, bw, label=f"the same, tpot_target_ms {mt['tpot_target_ms']:.1f}")
        title += f" ({mt['ttft_s']:.2f} s with the target)"
    ax.set_xticks(list(x), keys)
    ax.set_ylabel("time per output token (ms)")
    ax.set_title(_title(doc, title), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(doc: dict) -> str:
    r, e = doc["details"]["results"], doc["env"]
    pt, pd = _pred(r["predicted"]["ttft_s"]), _pred(r["predicted"]["decode_tok_s"])
    la = (e.get("loadavg") or [e.get("loadavg_1m", 0)])[0]
    lines = [f"# SLO report: {r['model']} (FP8, `cpu-only`, {r['n_slots']} slots, chunk {r['chunk_size']})", "",
             f"Machine: {e.get('cpu')} x{e.get('cores')} cores, {e.get('date')}, commit {e.get('commit')}, "
             f"load average {la:.1f}{' (--quick)' if e.get('quick') else ''}. Generated by `python -m benchmarks.slo`; "
             f"predicted = jaxmoe.planning.planner on jaxmoe/configs/hardware/{r['predicted']['hardware']}.json.", "",
             *(["GEMM yardstick (a fixed FP8 GEMM's measured / predicted speed, 1.0 = the quiet machine the "
                "prediction assumes): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in r["gemm_yardstick"].items()), ""]
               if r.get("gemm_yardstick") else []),
             "## Time to first token", "", "| prompt tokens | TTFT s (min-max) | predicted s | measured / predicted |",
             "|---:|---:|---:|---:|"]
    for x in r["ttft"]:
        p = pt.get(x["prompt"])
        lines.append(f"| {x['prompt']} | {_f(x['s'])} ({_f(x['min'])}-{_f(x['max'])}) | {_f(p)} | "
                     f"{_f(x['s'] / p if p else None, 2)} |")
    lines += ["", "## Decode vs context (batch 1)", "",
              "| context | tok/s | predicted tok/s | read pass GB/s | measured / predicted |", "|---:|---:|---:|---:|---:|"]
    for x in r["decode_context"]:
        p = pd.get(x["context"])
        lines.append(f"| {x['context']} | {_f(x['tok_s'], 1)} | {_f(p, 1)} | {_f(x['read_gb_s'], 1)} | "
                     f"{_f(x['tok_s'] / p if p else None, 2)} |")
    pb = _pred(r["predicted"].get("decode_batch_tok_s", {}))
    lines += ["", "## Decode vs batch (16-token prompts)", "",
              "| batch | total tok/s | per request tok/s | predicted total tok/s | measured / predicted | read pass GB/s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for x in r["decode_batch"]:
        p = pb.get(x["batch"])
        lines.append(f"| {x['batch']} | {_f(x['tok_s'], 1)} | {_f(x['tok_s_per_request'], 1)} | {_f(p, 1)} | "
                     f"{_f(x['tok_s'] / p if p else None, 2)} | {_f(x['read_gb_s'], 1)} |")
    m = r["mixed"]
    lines += ["", f"## Mixed: {m['decoders']} decoders, then a {m['long_prompt']}-token prompt arrives", "",
              "| figure | value |", "|---|---:|",
              f"| TTFT of the long prompt (s) | {_f(m['ttft_s'])} |"]
    for when in ("before", "during"):
        t = m[f"tpot_{when}_s"]
        lines.append(f"| decoders' TPOT {when} the prefill, p50 / p90 / p99 (ms) | {_f(1e3 * t['p50'] if t['p50'] else None, 1)}"
                     f" / {_f(1e3 * t['p90'] if t['p90'] else None, 1)} / {_f(1e3 * t['p99'] if t['p99'] else None, 1)} |")
    lines += [f"| decoded tok/s during the prefill | {_f(m['decode_tok_s_in_window'], 1)} |",
              f"| total tok/s (decoded + prompt) during the prefill | {_f(m['total_tok_s_in_window'], 1)} |"]
    for key in sorted(k for k in r if k.startswith("mixed_target")):  # mixed_target (2x), mixed_target_3x, ...
        mt, tag = r[key], "the target" if key == "mixed_target" else f"the {key.rsplit('_', 1)[1]} target"
        t = mt["tpot_during_s"]
        lines += [f"| with tpot_target_ms {_f(mt['tpot_target_ms'], 1)} ({mt['tpot_target_ms'] / (1e3 * mt['alone_tpot_s']):g}x "
                  f"the TPOT alone): TTFT of the long prompt (s) | {_f(mt['ttft_s'])} |",
                  f"| with {tag}: decoders' TPOT during the prefill, p50 / p90 / p99 (ms) | "
                  f"{_f(1e3 * t['p50'] if t['p50'] else None, 1)} / {_f(1e3 * t['p90'] if t['p90'] else None, 1)} / "
                  f"{_f(1e3 * t['p99'] if t['p99'] else None, 1)} |",
                  f"| with {tag}: prompt chunks (tokens: steps) | "
                  f"{', '.join(f'{k}: {v}' for k, v in mt.get('prompt_chunks', {}).items())} |",
                  f"| with {tag}: total tok/s during the prefill | {_f(mt['total_tok_s_in_window'], 1)} |"]
        if "stalls_over_1s" in mt:  # results before 2026-12-05 did not count them
            st = mt["stalls_over_1s"]
            lines.append(f"| with {tag}: decoders' gaps over 1 s (steps that compiled), count / seconds | "
                         f"{st['n']} / {_f(st['s'], 1)} |")
    lines += ["",
              "![TTFT](slo_ttft.png) ![decode vs context](slo_decode_context.png)",
              "![decode vs batch](slo_decode_batch.png) ![mixed](slo_mixed.png)", ""]
    return "\n".join(lines)


def render(doc: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [plot_ttft(doc, out_dir / FILES[0]), plot_decode_context(doc, out_dir / FILES[1]),
             plot_decode_batch(doc, out_dir / FILES[2]), plot_mixed(doc, out_dir / FILES[3])]
    (out_dir / FILES[4]).write_text(markdown(doc))
    return files + [out_dir / FILES[4]]
