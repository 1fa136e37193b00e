"""llama-bench: its command line and its `-o json` output.

`llama-bench -m M -t T -p P -n N -r R -o json` runs a prompt test ("ppP": prefill of P
tokens, one batch) and a generation test ("tgN": N tokens decoded one by one after an empty
context), each R times after a warm-up run, and prints a JSON array with one object per test:
`n_prompt`, `n_gen`, `n_threads`, `avg_ts` / `stddev_ts` (tokens/s over the R runs),
`samples_ts`, `samples_ns`, `model_type`, `model_size` (bytes), `model_n_params`, `cpu_info`,
`build_commit`, ... (logs go to stderr).

On CPUs with AMX, llama.cpp built natively repacks weights into AMX buffers, and on
DeepSeek-shaped models that aborts (`GGML_ASSERT(*cur_backend_id != -1)`). A user works
around it with `--repack 0`: `run_with_workaround` does the same when a run fails that way
(the assert in stderr, or any non-zero exit on a CPU with amx_tile) and says so.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from benchmarks._cpu import cpu_flags, has_amx

AMX_REPACK_ASSERT = "GGML_ASSERT(*cur_backend_id != -1)"
REPACK_WORKAROUND = "--repack 0 (AMX repack abort)"


class LlamaBenchError(RuntimeError):
    """llama-bench exited non-zero; `returncode` and `stderr` (its tail) kept for diagnosis."""

    def __init__(self, returncode: int, stderr: str, cmd: list[str]):
        super().__init__(f"llama-bench exited {returncode}: {stderr[-1500:]}")
        self.returncode, self.stderr, self.cmd = returncode, stderr, cmd


def llama_bench_cmd(binary: Path, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int,
                    repack: bool = True) -> list[str]:
    """The command line; repack=False adds `--repack 0` (weights stay in their GGUF layout)."""
    if threads < 1 or reps < 1 or n_prompt < 0 or n_gen < 0 or not (n_prompt or n_gen):
        raise ValueError(f"llama-bench: threads={threads}, reps={reps}, n_prompt={n_prompt}, n_gen={n_gen}")
    return [str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(reps), "-o", "json"] + ([] if repack else ["--repack", "0"])


def is_amx_repack_abort(returncode: int, stderr: str, flags: frozenset[str] | set[str] | None = None) -> bool:
    """True when a failed run looks like the AMX repack abort: non-zero exit with the assert in
    stderr, or any non-zero exit on a CPU whose flags (default: this CPU's) include amx_tile."""
    if returncode == 0:
        return False
    return AMX_REPACK_ASSERT in (stderr or "") or has_amx(cpu_flags() if flags is None else flags)


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


def run(binary: Path, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int, repack: bool = True,
        timeout: float = 1800) -> dict[str, dict]:
    """parse() of one llama-bench run; LlamaBenchError when it exits non-zero."""
    cmd = llama_bench_cmd(binary, model, threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps, repack=repack)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode:
        raise LlamaBenchError(r.returncode, r.stderr, cmd)
    return parse(r.stdout)


def run_with_workaround(binary: Path, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int,
                        repack: bool = True, flags: frozenset[str] | set[str] | None = None,
                        timeout: float = 1800) -> tuple[dict[str, dict], str | None]:
    """(parse() of the run, the workaround applied or None). With repack=True a run that fails
    as `is_amx_repack_abort` says is rerun with `--repack 0` (workaround REPACK_WORKAROUND);
    repack=False runs that way from the start (and names the workaround too). Any other
    failure, or one of the rerun, raises LlamaBenchError."""
    kw = dict(threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps, timeout=timeout)
    if repack:
        try:
            return run(binary, model, repack=True, **kw), None
        except LlamaBenchError as e:
            if not is_amx_repack_abort(e.returncode, e.stderr, flags):
                raise
            print(f"llama-bench exited {e.returncode} (AMX repack abort): rerunning with --repack 0", flush=True)
    return run(binary, model, repack=False, **kw), REPACK_WORKAROUND
