# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Benchmarks (quick mode)
#
# Every benchmark is `python -m benchmarks.<name> [--quick] --json PATH` and writes
# `{"metrics": ..., "env": ..., "details": ...}`. This notebook runs the quick modes (small sizes,
# few repeats: numbers for the shape of the curves, not for the record; the committed full
# runs are in `benchmarks/results/`) and shows them as tables and a plot.

# %%
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jaxmoe

# The repository root (benchmarks/ is not installed as a package): $JAXMOE_REPO, else the
# checkout this jaxmoe is imported from (an editable install).
ROOT = Path(os.environ.get("JAXMOE_REPO") or Path(jaxmoe.__file__).resolve().parents[1])
assert (ROOT / "benchmarks" / "_harness.py").is_file(), f"no benchmarks/ under {ROOT}; set JAXMOE_REPO"
out_dir = Path(tempfile.mkdtemp(prefix="jaxmoe-bench-nb-"))
BENCHES = ["kernels", "prefill"] + [n for n in ("e2e", "slo") if (ROOT / "benchmarks" / f"{n}.py").is_file()]

def run_bench(name, *extra):
    out = out_dir / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks.{name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    print(f"benchmarks.{name} --quick: {time.perf_counter() - t0:.1f} s")
    return json.loads(out.read_text())

# $JAXMOE_NB_BENCHES (comma-separated) limits which run live; the others show the committed
# full run from benchmarks/results/ when there is one (the test suite runs e2e's quick mode
# in its own test, so the notebook test skips it to stay fast).
# $JAXMOE_NB_PREFILL_LENGTHS (e.g. "64") narrows the live prefill run's prompt lengths.
LIVE = os.environ.get("JAXMOE_NB_BENCHES", ",".join(BENCHES)).split(",")
EXTRA = {"prefill": ["--lengths", os.environ["JAXMOE_NB_PREFILL_LENGTHS"]] if os.environ.get("JAXMOE_NB_PREFILL_LENGTHS") else []}
results, source = {}, {}
for name in BENCHES:
    committed = ROOT / "benchmarks" / "results" / f"{name}.json"
    if name in LIVE:
        results[name], source[name] = run_bench(name, *EXTRA.get(name, [])), "this run, --quick"
    elif committed.is_file():
        results[name], source[name] = json.loads(committed.read_text()), f"committed {committed.relative_to(ROOT)}"
for name, doc in results.items():
    env = doc["env"]
    print(f"{name:8} {source[name]:40}", {k: env.get(k) for k in ("cpu", "cores", "jax", "commit", "date")})


# %%
def show_table(rows, columns):
    """A markdown table (rendered by Jupyter, readable as text otherwise)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    try:
        from IPython.display import Markdown, display  # noqa: PLC0415  (outside Jupyter: print)
        display(Markdown(text))
    except ImportError:
        print(text)

for name, doc in results.items():
    print(f"## {name}")
    show_table([{"metric": k, "value": v} for k, v in doc["metrics"].items()], ["metric", "value"])

# %% [markdown]
# ## FP8 expert GEMV: GB/s against the read-only bandwidth of the same run
#
# Each GEMV timing is paired with a read-only pass over the same bytes (this machine's
# bandwidth drifts with host load; only ratios from one run are stable).

# %%
gemv = results["kernels"]["details"]["gemv"]
rows = [{"threads": k.split("_")[0][1:], "M": k.split("_")[1][1:], "ms": round(v["ms"], 2),
         "GB/s": round(v["gbps"], 2), "read GB/s": round(v["read_gbps"], 2),
         "fraction of read": round(v["frac_of_read"], 3)} for k, v in gemv.items()]
show_table(rows, ["threads", "M", "ms", "GB/s", "read GB/s", "fraction of read"])

# %% [markdown]
# ## Prefill strategies (tiny model)

# %%
pre = results["prefill"]["details"]
print(pre.get("note", ""))
prows = [{"strategy": r["strategy"], "tokens": r["tokens"], "tok/s": round(r["tok_s"], 1),
          "predicted tok/s": round(r["predicted_tok_s"], 1) if r.get("predicted_tok_s") else "",
          "measured/predicted": round(r["measured_over_predicted"], 3) if r.get("measured_over_predicted") else ""}
         for r in pre["results"].values()]
show_table(prows, ["strategy", "tokens", "tok/s", "predicted tok/s", "measured/predicted"])

# %% [markdown]
# ## Plots (when matplotlib is installed)

# %%
try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib is not installed: no plots (pip install matplotlib)")

if plt is not None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for threads in sorted({r["threads"] for r in rows}):
        sel = [r for r in rows if r["threads"] == threads]
        axes[0].plot([int(r["M"]) for r in sel], [r["GB/s"] for r in sel], "o-", label=f"GEMV, {threads} threads")
        axes[0].plot([int(r["M"]) for r in sel], [r["read GB/s"] for r in sel], "--", alpha=0.6,
                     label=f"read pass, {threads} threads")
    axes[0].set(xlabel="tokens (M)", ylabel="GB/s", title="FP8 expert GEMV vs read bandwidth", xscale="log")
    axes[0].legend(fontsize=8)
    strategies = sorted({r["strategy"] for r in prows})
    for s in strategies:
        sel = sorted((r for r in prows if r["strategy"] == s), key=lambda r: r["tokens"])
        axes[1].plot([r["tokens"] for r in sel], [r["tok/s"] for r in sel], "o-", label=s)
    axes[1].set(xlabel="prompt tokens", ylabel="tok/s", title="prefill (tiny, quick)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "quick_benchmarks.png", dpi=80)
    plt.show()

# %% [markdown]
# ## End to end (when `benchmarks/e2e.py` exists)

# %%
if "e2e" in results:
    e2e = results["e2e"]
    show_table([{"metric": k, "value": v} for k, v in e2e["metrics"].items()], ["metric", "value"])
else:
    print("no e2e results: benchmarks/e2e.py is not in this checkout, or it did not run and none is committed")

# %% [markdown]
# ## SLO report (`benchmarks/slo.py`)
#
# Time to first token against prompt length, decode tok/s against context and batch, and a long
# prompt arriving while requests decode, beside the performance model's predictions for this
# machine. The plots come from this run's `--quick` (tiny model) when it ran live, else from the
# committed full run (`benchmarks/results/slo.md`).

# %%
if "slo" in results:
    slo_dir = out_dir if source["slo"].startswith("this run") else ROOT / "benchmarks" / "results"
    show_table([{"metric": k, "value": v} for k, v in results["slo"]["metrics"].items()], ["metric", "value"])
    pngs = sorted(slo_dir.glob("slo_*.png"))
    try:
        from IPython.display import Image, display
    except ImportError:
        display = None
    for f in pngs:
        print(f.name)
        if display is not None:
            display(Image(filename=str(f)))
else:
    print("no SLO results: benchmarks/slo.py is not in this checkout, or it did not run and none is committed")
