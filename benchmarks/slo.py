"""SLO report: what a user of the serving engine sees on the machine this runs on.

On a synthetic FP8 checkpoint placed on cpu_ext and served by `Engine(..., "cpu-only")`:
- TTFT against prompt length: one request, max_new_tokens=1, submit -> first token
  (every KV window compiled beforehand by a run of the longest prompt);
- decode tok/s against context length (batch 1, prompt of that length, then steady steps)
  and against batch size (short prompts), each step paired with a read-only pass over the
  native matrices of one token (benchmarks/e2e.decode);
- a mixed workload: `decoders` requests decoding when one long prompt arrives: TTFT of the
  long one, time per output token (TPOT) of the decoders p50/p90/p99 before it and while it
  prefills (chunked prefill shares the steps), and throughput during the window; then the
  same workload with `tpot_target_ms` = 2x and 3x the decoders' TPOT alone measured just before
  (`mixed_target`, `mixed_target_3x`: the planner's step model, corrected by the steps it
  measures, sizes the prompt chunks beside the decoders);
- beside each measured curve, the performance model's prediction for this machine
  (jaxmoe.planning.planner.estimate_prefill "cpu" / estimate_decode with
  jaxmoe/configs/hardware/this-machine.json: its "cpu_kernels" step model); the planner has no
  mixed-load model.

Default model: `demo` (4 layers, hidden 1024, 16 experts), fast enough on a 2-core box for
every curve; bench-v3-mid prefills so much slower that its curves would take over an hour
there (use --config bench-v3-mid on a bigger machine; docs/PERFORMANCE_MODEL.md,
"Measurements behind design choices"). --quick: tiny, tiny sizes.

    python -m benchmarks.slo [--quick] [--config demo] [--json PATH] [--out-dir DIR]
    python -m benchmarks.slo --render PATH.json [--out-dir DIR]   # plots + table only

Writes slo.json, slo.md and slo_*.png into benchmarks/results/ (per CPU class:
_harness.default_result; a full run) or --out-dir
(--quick: beside --json, or a temporary directory). Plotting: benchmarks/_plots.py.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import _harness as H

# the mixed workload again under tpot_target_ms = factor x the decoders' TPOT alone: result key -> factor
TARGETS = {"mixed_target": 2.0, "mixed_target_3x": 3.0}
SIZES = {
    "full": {"ttft": [64, 128, 256, 512, 1024], "context": [64, 256, 1024, 2048], "batch": [1, 2, 4],
             "mixed_long": 1024, "decoders": 3, "steps": 8, "warm": 2, "repeats": 2},
    "quick": {"ttft": [16, 32, 48], "context": [8, 32], "batch": [1, 2, 4],
              "mixed_long": 40, "decoders": 3, "steps": 3, "warm": 1, "repeats": 1},
}


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    a = np.asarray(xs, float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "max": float(a.max()), "n": len(xs)}


def ttft(engine, cfg, n: int, rng) -> float:
    req = engine.submit(rng.integers(2, cfg.vocab_size, n).tolist(), 1, eos_token_ids=(), background=False)
    engine.run_until_idle()
    assert req.first_token_at is not None, f"prompt of {n} tokens produced no token"
    return req.first_token_at - req.submitted_at


def mixed(engine, cfg, decoders: int, long_n: int, rng, before_steps: int = 6) -> dict:
    """`decoders` short requests decode; after `before_steps` steady steps a `long_n`-token
    prompt arrives. Token times of the decoders are taken after each engine step."""
    from jaxmoe.serving.sampling import SamplingParams  # noqa: PLC0415

    budget = engine.max_len - 16 - 1
    decs = [engine.submit(rng.integers(2, cfg.vocab_size, 16).tolist(), budget, SamplingParams(), eos_token_ids=(),
                          background=False) for _ in range(decoders)]
    while any(not r.output_ids for r in decs):
        engine.step()
    times: list[list[float]] = [[] for _ in decs]
    counts = [len(r.output_ids) for r in decs]

    def step() -> float:
        engine.step()
        t = time.perf_counter()
        for i, r in enumerate(decs):
            if len(r.output_ids) > counts[i]:
                counts[i] = len(r.output_ids)
                times[i].append(t)
        return t

    t_prev = step()
    for _ in range(before_steps):
        step()
    n_before = [len(t) for t in times]
    t_arrive = time.perf_counter()
    long = engine.submit(rng.integers(2, cfg.vocab_size, long_n).tolist(), 1, eos_token_ids=(), background=False)
    tok0 = sum(counts)
    chunks: list[int] = []  # the long prompt's tokens per step
    while long.first_token_at is None:
        done = long.n_prefilled
        step()
        chunks.append(long.n_prefilled - done)
    t_end = time.perf_counter()
    decoded = sum(counts) - tok0
    for r in decs:
        r.cancel()
    engine.run_until_idle()
    gaps_before = [b - a for ts, k in zip(times, n_before) for a, b in zip(ts[:k], ts[1:k])]
    gaps_during = [b - a for ts, k in zip(times, n_before) for a, b in zip(ts[k - 1:], ts[k:])]
    del t_prev
    window = t_end - t_arrive
    return {"decoders": decoders, "long_prompt": long_n, "ttft_s": long.first_token_at - long.submitted_at,
            "tpot_before_s": percentiles(gaps_before), "tpot_during_s": percentiles(gaps_during),
            "window_s": window, "decoded_tokens_in_window": decoded,
            "prompt_steps": len(chunks), "prompt_chunks": {str(c): chunks.count(c) for c in sorted(set(chunks))},
            "stalls_over_1s": stalls(gaps_during),
            "decode_tok_s_in_window": decoded / window, "prompt_tok_s_in_window": long_n / window,
            "total_tok_s_in_window": (decoded + long_n) / window}


def stalls(gaps: list[float], over: float = 1.0) -> dict:
    """The decoders' token gaps longer than `over` seconds (a step that compiled a program, as
    far as this workload goes): how many, and their seconds."""
    long = [g for g in gaps if g > over]
    return {"n": len(long), "s": round(sum(long), 3)}


def predicted(cfg, hw, chunk: int, ttft_lengths, contexts, batches=(), *, steps: int = 0, warm: int = 0,
              batch_prompt: int = 16, n_slots: int | None = None) -> dict:
    """The planner's figures for the measured points. A decode point's context is its prompt
    plus the steps before the middle of the timed ones (`warm` + `steps` / 2): the key window
    a step attends over follows the sequence's length."""
    from jaxmoe.planning.planner import estimate_decode, estimate_prefill  # noqa: PLC0415

    grown = warm + steps // 2
    return {"hardware": hw.name, "calibrated_from": list(hw.calibrated_from),
            "ttft_s": {n: estimate_prefill(cfg, hw, n, "cpu", cpu_chunk=chunk).seconds for n in ttft_lengths},
            "decode_tok_s": {c: estimate_decode(cfg, hw, context=c + grown).tok_per_s for c in contexts},
            "decode_batch_tok_s": {b: estimate_decode(cfg, hw, context=batch_prompt + grown, batch=b,
                                                      n_slots=n_slots).tok_per_s for b in batches}}


def measure(args) -> dict:
    sz = dict(SIZES["quick" if args.quick else "full"])
    name = args.config or ("tiny" if args.quick else "demo")
    import jaxmoe  # noqa: PLC0415
    from benchmarks import e2e  # noqa: PLC0415
    from jaxmoe.cpu._lib import load as load_native  # noqa: PLC0415
    from jaxmoe.planning.hardware import load_hardware  # noqa: PLC0415
    from jaxmoe.serving.engine import Engine  # noqa: PLC0415

    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-slo-") if args.quick and args.config is None else None
    path, _ = e2e.checkpoint(name, Path(tmp.name) if tmp else e2e.cache_dir())
    t0 = time.perf_counter()
    model = jaxmoe.load(path, runtime="cpu-only", cpu_kernels=True)
    cfg = model.cfg
    e2e.TOP_K[0] = cfg.num_experts_per_tok
    limit = cfg.max_position_embeddings
    sz["ttft"] = [n for n in sz["ttft"] if n < limit]
    sz["context"] = [n for n in sz["context"] if n + sz["warm"] + sz["steps"] + 4 < limit]
    sz["mixed_long"] = min(sz["mixed_long"], limit // 2)
    max_len = min(limit, 1 << (max(sz["ttft"] + sz["context"] + [sz["mixed_long"]]) + 32).bit_length())
    engine = Engine(cfg, model.weights, model.runtime, max_len=max_len)
    nat = load_native()
    mats, _, _ = e2e.token_matrices(model.weights, nat)
    read, kbytes = e2e.read_fn(nat, mats), e2e.matrix_bytes(nat, mats)
    rng = np.random.default_rng(0)
    print(f"slo: {name}, {engine.n_slots} slots, chunk {engine.chunk_size}, max_len {max_len}; loaded in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    t0 = time.perf_counter()
    ttft(engine, cfg, max(sz["ttft"] + sz["context"]), rng)  # compiles every KV window of the chunked steps
    e2e.decode(engine, cfg, 1, 1, 1, read, None, 16, rng)  # and the decode step
    compile_s = time.perf_counter() - t0
    print(f"slo: compiled in {compile_s:.0f} s", flush=True)

    out: dict = {"model": name, "n_slots": engine.n_slots, "chunk_size": engine.chunk_size, "max_len": max_len,
                 "sizes": sz, "compile_s": compile_s, "read_pass_bytes": kbytes}
    from benchmarks.prefill import _GemmYardstick  # noqa: PLC0415

    hw = load_hardware("this-machine")
    yard = _GemmYardstick(hw) if hw.kernels is not None else None
    out["gemm_yardstick"] = {}  # measured / predicted speed of a fixed GEMM: how loaded the box was
    if yard:
        out["gemm_yardstick"]["before_ttft"] = yard()
    out["ttft"] = []
    for n in sz["ttft"]:
        ttft(engine, cfg, n, rng)  # warm-up: compiles the step width this prompt length uses
        ts = [ttft(engine, cfg, n, rng) for _ in range(sz["repeats"])]
        out["ttft"].append({"prompt": n, "s": statistics.median(ts), "min": min(ts), "max": max(ts)})
        print(f"ttft {n:5d} tokens: {statistics.median(ts):.3f} s", flush=True)

    def dec(batch: int, prompt: int) -> dict:
        r = e2e.decode(engine, cfg, batch, sz["steps"], sz["warm"], read, None, prompt, rng)
        return {"batch": batch, "context": prompt, "tok_s": batch / r["step_s"]["median"],
                "tok_s_per_request": 1 / r["step_s"]["median"], "step_s": r["step_s"],
                "read_gb_s": kbytes / r["read_s"]["median"] / 1e9}

    if yard:
        out["gemm_yardstick"]["before_decode"] = yard()
    out["decode_context"] = []
    for c in sz["context"]:
        out["decode_context"].append(dec(1, c))
        print(f"decode at context {c:5d}: {out['decode_context'][-1]['tok_s']:.1f} tok/s", flush=True)
    out["decode_batch"] = []
    for b in [b for b in sz["batch"] if b <= engine.n_slots]:
        out["decode_batch"].append(dec(b, 16))
        print(f"decode batch {b}: {out['decode_batch'][-1]['tok_s']:.1f} tok/s", flush=True)
    if yard:
        out["gemm_yardstick"]["after_decode"] = yard()
        yard.close()
    decoders = min(sz["decoders"], engine.n_slots - 1)
    mixed(engine, cfg, decoders, sz["mixed_long"], rng)  # warm-up: the mixed steps' shapes compile once
    out["mixed"] = mixed(engine, cfg, decoders, sz["mixed_long"], rng)
    mx = out["mixed"]
    print(f"mixed: {decoders} decoders + a {mx['long_prompt']}-token prompt: TTFT {mx['ttft_s']:.2f} s; decoders' "
          f"TPOT p50 {mx['tpot_during_s']['p50']:.3f} s (before {mx['tpot_before_s']['p50']:.3f} s)", flush=True)
    alone = mx["tpot_before_s"]["p50"]
    for key, factor in TARGETS.items():
        target_ms = factor * 1e3 * alone
        engine.set_tpot_target(target_ms)
        mixed(engine, cfg, decoders, sz["mixed_long"], rng)  # warm-up: the narrower chunks' shapes, the model's correction
        out[key] = {"tpot_target_ms": target_ms, "alone_tpot_s": alone, **mixed(engine, cfg, decoders, sz["mixed_long"], rng)}
        engine.set_tpot_target(None)
        mt = out[key]
        print(f"mixed, tpot_target_ms {target_ms:.1f} ({factor:g}x alone): TTFT {mt['ttft_s']:.2f} s; decoders' TPOT "
              f"p50 / p99 {mt['tpot_during_s']['p50']:.3f} / {mt['tpot_during_s']['p99']:.3f} s; chunks "
              f"{mt['prompt_chunks']}; gaps over 1 s (compiles) {mt['stalls_over_1s']}", flush=True)
    out["predicted"] = predicted(cfg, hw, engine.chunk_size, sz["ttft"], sz["context"],
                                 [x["batch"] for x in out["decode_batch"]], steps=sz["steps"], warm=sz["warm"],
                                 n_slots=engine.n_slots)
    engine = None
    model.close()
    if tmp is not None:
        tmp.cleanup()
    return out


def summary(res: dict) -> dict:
    """The headline figures (metrics) of a measured result."""
    mx, b = res["mixed"], {r["batch"]: r for r in res["decode_batch"]}
    t = {r["prompt"]: r["s"] for r in res["ttft"]}
    longest = max(t)
    pt = {int(k): v for k, v in res["predicted"]["ttft_s"].items()}  # JSON keys are strings
    pd = {int(k): v for k, v in res["predicted"]["decode_tok_s"].items()}
    return {
        "model": res["model"],
        "ttft_s_shortest": round(t[min(t)], 4), "ttft_shortest_prompt": min(t),
        f"ttft_s_{longest}": round(t[longest], 4),
        "decode_tok_s_b1": round(b[1]["tok_s"], 2) if 1 in b else None,
        f"decode_tok_s_b{max(b)}": round(b[max(b)]["tok_s"], 2),
        f"decode_tok_s_ctx{res['decode_context'][-1]['context']}": round(res["decode_context"][-1]["tok_s"], 2),
        "mixed_long_prompt": mx["long_prompt"], "mixed_decoders": mx["decoders"],
        "mixed_ttft_s": round(mx["ttft_s"], 3),
        "mixed_tpot_p50_s": round(mx["tpot_during_s"]["p50"], 4), "mixed_tpot_p99_s": round(mx["tpot_during_s"]["p99"], 4),
        "mixed_tpot_before_p50_s": round(mx["tpot_before_s"]["p50"], 4),
        "mixed_total_tok_s": round(mx["total_tok_s_in_window"], 1),
        "ttft_measured_over_predicted_longest": round(t[longest] / pt[longest], 3),
        "decode_measured_over_predicted_ctx_first": round(
            res["decode_context"][0]["tok_s"] / pd[res["decode_context"][0]["context"]], 3),
        "decode_measured_over_predicted_ctx_last": round(
            res["decode_context"][-1]["tok_s"] / pd[res["decode_context"][-1]["context"]], 3),
    } | _batch_ratio(res, b) | _target(res)


def _target(res: dict) -> dict:
    """The mixed workload under each tpot_target_ms (TARGETS), where measured."""
    out = {}
    for key in TARGETS:
        mt = res.get(key)
        if mt:
            p99 = mt["tpot_during_s"]["p99"]
            out |= {f"{key}_tpot_ms": round(mt["tpot_target_ms"], 2), f"{key}_ttft_s": round(mt["ttft_s"], 3),
                    f"{key}_tpot_p50_s": round(mt["tpot_during_s"]["p50"], 4), f"{key}_tpot_p99_s": round(p99, 4),
                    f"{key}_p99_over_target": round(p99 * 1e3 / mt["tpot_target_ms"], 3)}
    return out


def _batch_ratio(res: dict, b: dict) -> dict:
    pb = {int(k): v for k, v in res["predicted"].get("decode_batch_tok_s", {}).items()}
    top = max(b)
    return {f"decode_measured_over_predicted_b{top}": round(b[top]["tok_s"] / pb[top], 3)} if top in pb else {}


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="jaxmoe/configs/models name (default demo; tiny with --quick)")
    ap.add_argument("--out-dir", default=None, help="where slo.md and the PNGs go")
    ap.add_argument("--render", metavar="JSON", default=None, help="only render the plots and table of a result")
    args = ap.parse_args(argv)
    from benchmarks import _plots  # noqa: PLC0415

    if args.render:
        doc = json.loads(Path(args.render).read_text())
        out_dir = Path(args.out_dir or Path(args.render).parent)
    else:
        res = measure(args)
        env = H.env_info(quick=args.quick, loadavg=list(os.getloadavg()),
                         machine="shared 2-core box, loaded by other engineers' runs")
        details = {"results": res, "notes": {
            "ttft": "submit -> first token of one request (max_new_tokens=1), median of repeats; KV windows compiled before",
            "decode": "benchmarks/e2e.decode: steady steps timed alone, each after a read-only pass over one token's "
                      "native matrices (read_gb_s); tok_s = batch / median step",
            "mixed": "decoders' token gaps (TPOT) from the time after each engine step; 'during' = from the long "
                     "prompt's arrival to its first token; total_tok_s = (decoded + prompt tokens) / that window",
            "mixed_target": "the same workload on the same engine with tpot_target_ms = 2 x mixed.tpot_before_s.p50 "
                            "(alone_tpot_s), after one warm-up run under it: each step's prompt chunk beside the "
                            "decoders sized by the planner's CPU step model (KernelModel.mixed_step, this-machine "
                            "profile) corrected by the steps it measured (serving/step_model.py); prompt_chunks: "
                            "tokens -> steps; stalls_over_1s: the decoders' token gaps over 1 s (steps that "
                            "compiled a program), how many and their sum",
            "mixed_target_3x": "the same with tpot_target_ms = 3 x alone_tpot_s",
            "predicted": "jaxmoe.planning.planner on jaxmoe/configs/hardware/this-machine.json: estimate_prefill(strategy "
                         "'cpu', cpu_chunk=engine chunk) and estimate_decode(context=prompt + warm + steps/2, "
                         "batch)"}}
        doc = H.write(None, {}, env, details)
        doc["metrics"] = summary(res)
        if args.quick:
            out_dir = Path(args.out_dir) if args.out_dir else (Path(args.json).parent if args.json else None)
        else:
            out_dir = Path(args.out_dir) if args.out_dir else H.default_result("slo.json").parent
        for p in ([args.json] if args.json else []) + ([] if args.quick else [out_dir / "slo.json"]):
            H.write(p, doc["metrics"], doc["env"], doc["details"])
    if out_dir is not None:
        files = _plots.render(doc, out_dir)
        print("wrote " + ", ".join(str(f) for f in files), flush=True)
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in doc["metrics"].items()), flush=True)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
