"""llama-bench: its command line and its `-o json` output.

`llama-bench -m M -t T -p P -n N -r R -o json` runs a prompt test ("ppP": prefill of P
tokens, one batch) and a generation test ("tgN": N tokens decoded one by one after an empty
context), each R times after a warm-up run, and prints a JSON array with one object per test:
`n_prompt`, `n_gen`, `n_threads`, `avg_ts` / `stddev_ts` (tokens/s over the R runs),
`samples_ts`, `samples_ns`, `model_type`, `model_size` (bytes), `model_n_params`, `cpu_info`,
`build_commit`, ... (logs go to stderr).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path


def llama_bench_cmd(binary: Path, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int) -> list[str]:
    if threads < 1 or reps < 1 or n_prompt < 0 or n_gen < 0 or not (n_prompt or n_gen):
        raise ValueError(f"llama-bench: threads={threads}, reps={reps}, n_prompt={n_prompt}, n_gen={n_gen}")
    return [str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(reps), "-o", "json"]


def test_name(rec: dict) -> str:
    """llama-bench's own names: "pp512", "tg64", or "pp512+tg64" for a combined test."""
    p, n = int(rec.get("n_prompt", 0)), int(rec.get("n_gen", 0))
    return "+".join(([f"pp{p}"] if p else []) + ([f"tg{n}"] if n else [])) or "empty"


def parse(text: str) -> dict[str, dict]:
    """The JSON array llama-bench printed (anything before the `[` is ignored) as
    {test name: record with `tok_s` = {median, min, max, mean, stddev} over its samples}."""
    i = text.find("[")
    if i < 0:
        raise ValueError("llama-bench output holds no JSON array (was it run with -o json?)")
    recs = json.loads(text[i:])
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise ValueError("llama-bench JSON: expected an array of objects")
    out = {}
    for r in recs:
        for key in ("n_prompt", "n_gen", "avg_ts"):
            if key not in r:
                raise ValueError(f"llama-bench JSON record lacks {key!r}: {sorted(r)[:12]}")
        samples = [float(x) for x in r.get("samples_ts") or [r["avg_ts"]]]
        rec = dict(r)
        rec["tok_s"] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                        "mean": float(r["avg_ts"]), "stddev": float(r.get("stddev_ts", 0.0)), "n": len(samples)}
        out[test_name(r)] = rec
    return out


def run(binary: Path, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int,
        timeout: float = 1800) -> dict[str, dict]:
    cmd = llama_bench_cmd(binary, model, threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode:
        raise RuntimeError(f"llama-bench exited {r.returncode}: {r.stderr[-1500:]}")
    return parse(r.stdout)
