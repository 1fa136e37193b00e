"""The peer: llama.cpp and jaxmoe on the same model, the same weights and the same threads.

llama.cpp comes from the llama-cpp-python sdist on PyPI, built once (llama-bench) into a
cache outside the repository ($JAXMOE_LLAMACPP_CACHE, default ~/.cache/jaxmoe/llamacpp);
our synthetic checkpoint (default bench-v3-mid, the random weights jaxmoe runs) is converted
to GGUF q8_0 and bf16 with the sdist's converter (benchmarks/_llamacpp/). Then, for a few
rounds, alternating which engine goes first:
- llama-bench per GGUF type: tgN (decode of N tokens) and ppP (prefill of P tokens), -r R;
- jaxmoe (`Engine(..., "cpu-only")`, FP8 checkpoint on cpu_ext): decode at batch 1 (the
  steady steps after a 16-token prompt, benchmarks/e2e.decode) and one P-token prefill
  (benchmarks/e2e.prefill, wall time of the whole prompt, after a compile run);
- a read-only bandwidth pass (jaxmoe's native matrices of one token) before each engine's turn.
Where llama-bench aborts repacking weights for AMX, it is rerun with `--repack 0`
(benchmarks/_llamacpp/bench.py) and details.llama_bench_workaround says so.
Reported: tok/s of both (medians over rounds) and jaxmoe / llama.cpp ratios, the ratio of
each round too (same round = the same load on the shared machine).

    python -m benchmarks.peer_llamacpp [--quick] [--threads 2] [--json PATH]

--quick (CI): the tiny model; llama.cpp only if a built llama-bench is already in the cache
(never downloads or builds), else the peer is recorded as skipped with the reason.
    python -m benchmarks.peer_llamacpp --config qwen3-moe-mid   # Qwen3-MoE (llama.cpp's qwen3moe)

Results: PATH if given, and benchmarks/results/peer_llamacpp.json for a full run
(peer_llamacpp-<model>.json with another --config).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import _harness as H
from benchmarks._llamacpp import bench as LB
from benchmarks._llamacpp import convert as LC
from benchmarks._llamacpp import fetch as LF

TARGETS = {"ratio_decode_vs_q8_0": 1.3, "ratio_prefill{n}_vs_q8_0": 1.0}


DEFAULT_MODEL = "bench-v3-mid"


def result_name(model: str) -> str:
    """The results file's stem: peer_llamacpp for the default model, peer_llamacpp-<model> for another."""
    return "peer_llamacpp" if model == DEFAULT_MODEL else f"peer_llamacpp-{model}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def setup_peer(checkpoint: Path, model: str, types: list[str], *, allow_fetch: bool) -> dict:
    """{"binary", "gguf": {type: path}, "notes"} or {"skipped": reason}."""
    cache = LF.cache_dir()
    try:
        binary = LF.ensure_llama_bench(cache, allow_network=allow_fetch, allow_build=allow_fetch)
        src = LF.source_dir(cache)
        ggufs, notes = {}, []
        for t in types:
            if not LC.gguf_path(cache, model, t, checkpoint).is_file() and src is None:
                src = LF.fetch_source(cache, allow_network=allow_fetch)
            t0 = time.perf_counter()
            ggufs[t], n = LC.ensure_gguf(cache, src, checkpoint, model, t)
            notes += [f"{t}: {x}" for x in n] + [f"{t}: ready in {time.perf_counter() - t0:.0f} s"]
            print(f"llama.cpp: GGUF {t} {ggufs[t]} ({ggufs[t].stat().st_size / 1e9:.2f} GB)", flush=True)
        return {"binary": binary, "gguf": ggufs, "notes": notes, "cache": str(cache)}
    except (LF.PeerUnavailable, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"llama.cpp: skipped ({e})", flush=True)
        return {"skipped": str(e), "cache": str(cache)}


def jaxmoe_side(name: str, root: Path, n_prompt: int):
    """Load the checkpoint on the cpu-only engine; returns what the rounds need."""
    import jaxmoe  # noqa: PLC0415
    from benchmarks import e2e  # noqa: PLC0415
    from jaxmoe.cpu._lib import load as load_native  # noqa: PLC0415
    from jaxmoe.serving.engine import Engine  # noqa: PLC0415

    path, reused = e2e.checkpoint(name, root)
    t0 = time.perf_counter()
    model = jaxmoe.load(path, runtime="cpu-only", cpu_kernels=True)
    cfg = model.cfg
    e2e.TOP_K[0] = cfg.num_experts_per_tok
    nat = load_native()
    max_len = min(cfg.max_position_embeddings, 1 << max(n_prompt, 64).bit_length())
    engine = Engine(cfg, model.weights, model.runtime, max_len=max_len)
    mats, _, _ = e2e.token_matrices(model.weights, nat)
    print(f"jaxmoe: {name} {path} ({'reused' if reused else 'written'}), loaded in {time.perf_counter() - t0:.0f} s; "
          f"{engine.n_slots} slots, chunk {engine.chunk_size}, kernel threads {nat.lib.jm_num_threads()}", flush=True)
    return model, engine, nat, mats, path


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines (llama-bench -t, JAXMOE_CPU_THREADS)")
    ap.add_argument("--config", default=None, help="jaxmoe/configs/models name (default bench-v3-mid; tiny with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; 1 with --quick)")
    ap.add_argument("--prompt", type=int, default=None, help="prefill tokens (default 512; 64 with --quick)")
    ap.add_argument("--gen", type=int, default=None, help="llama-bench decode tokens (default 32; 8 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="jaxmoe timed decode steps per round (default 12)")
    ap.add_argument("--types", default="q8_0,bf16", help="GGUF types for llama.cpp")
    ap.add_argument("--no-fetch", action="store_true", help="never download or build llama.cpp (--quick implies it)")
    args = ap.parse_args(argv)
    quick = args.quick
    name = args.config or ("tiny" if quick else DEFAULT_MODEL)
    rounds = args.rounds or (1 if quick else 3)
    n_prompt = args.prompt or (64 if quick else 512)
    n_gen = args.gen or (8 if quick else 32)
    steps, warm = args.steps or (4 if quick else 12), 2 if quick else 3
    reps = args.repeats or (1 if quick else 2)
    types = [t for t in args.types.split(",") if t]
    os.environ["JAXMOE_CPU_THREADS"] = str(args.threads)  # before the native library starts its pool

    from benchmarks import e2e  # noqa: PLC0415

    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-peer-") if quick and args.config is None else None
    root = Path(tmp.name) if tmp else e2e.cache_dir()
    model, engine, nat, mats, path = jaxmoe_side(name, root, n_prompt)
    peer = setup_peer(path, name, types, allow_fetch=not (quick or args.no_fetch))
    cfg, rng = model.cfg, np.random.default_rng(0)
    read = e2e.read_fn(nat, mats)
    kbytes = e2e.matrix_bytes(nat, mats)

    def read_gbs() -> float:
        return kbytes / H.timeit(read, 3, warmup=1)["median"] / 1e9

    t0 = time.perf_counter()
    e2e.decode(engine, cfg, 1, 1, 1, read, None, 16, rng)  # compiles the decode and chunk shapes
    e2e.prefill(engine, cfg, n_prompt, 1, rng, warmup=False)  # compiles every KV window of the prompt
    engine._e2e_windows = {w for w in (64, 128, 256, 512, 1024, 2048) if w <= engine.max_len}
    t_compile = time.perf_counter() - t0
    print(f"jaxmoe: compiled in {t_compile:.0f} s", flush=True)

    def run_jaxmoe() -> dict:
        bw = read_gbs()
        d = e2e.decode(engine, cfg, 1, steps, warm, read, None, 16, rng)
        p = e2e.prefill(engine, cfg, n_prompt, 1, rng, warmup=False)
        out = {"read_gb_s": bw, "decode_tok_s": 1 / d["step_s"]["median"], "decode_step_s": d["step_s"],
               "prefill_tok_s": p["tokens"] / p["s"]["median"], "prefill_s": p["s"]["median"],
               "prefill_steady_tok_s": p["tok_s"]}
        print(f"  jaxmoe: decode {out['decode_tok_s']:.2f} tok/s, prefill {n_prompt} {out['prefill_tok_s']:.1f} tok/s; "
              f"read pass {bw:.1f} GB/s", flush=True)
        return out

    workaround: dict[str, str] = {}  # GGUF type -> workaround once one was needed (later rounds start with it)

    def run_llama() -> dict:
        out = {}
        for t, g in peer["gguf"].items():
            bw = read_gbs()
            res, wa = LB.run_with_workaround(peer["binary"], g, threads=args.threads, n_prompt=n_prompt, n_gen=n_gen,
                                             reps=reps, repack=t not in workaround)
            if wa:
                workaround[t] = wa
            pp, tg = res[f"pp{n_prompt}"], res[f"tg{n_gen}"]
            out[t] = {"read_gb_s": bw, "decode_tok_s": tg["tok_s"]["median"], "prefill_tok_s": pp["tok_s"]["median"],
                      "tg": tg["tok_s"], "pp": pp["tok_s"], "model_size": tg.get("model_size"),
                      "model_n_params": tg.get("model_n_params"), "build_commit": tg.get("build_commit"),
                      "n_threads": tg.get("n_threads"), "workaround": wa}
            print(f"  llama.cpp {t}: tg{n_gen} {out[t]['decode_tok_s']:.2f} tok/s, pp{n_prompt} "
                  f"{out[t]['prefill_tok_s']:.1f} tok/s; read pass {bw:.1f} GB/s", flush=True)
        return out

    per_round = []
    for r in range(rounds):
        order = ["jaxmoe", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "jaxmoe"]
        print(f"round {r + 1}/{rounds}: {' then '.join(order)}", flush=True)
        rec = {"order": order}
        for eng in order:
            if eng == "jaxmoe":
                rec["jaxmoe"] = run_jaxmoe()
            elif "skipped" not in peer:
                rec["llama.cpp"] = run_llama()
        for t in types:
            lc = rec.get("llama.cpp", {}).get(t)
            if lc:
                rec[f"ratio_decode_vs_{t}"] = _ratio(rec["jaxmoe"]["decode_tok_s"], lc["decode_tok_s"])
                rec[f"ratio_prefill{n_prompt}_vs_{t}"] = _ratio(rec["jaxmoe"]["prefill_tok_s"], lc["prefill_tok_s"])
        per_round.append(rec)

    jd = _median([x["jaxmoe"]["decode_tok_s"] for x in per_round])
    jp = _median([x["jaxmoe"]["prefill_tok_s"] for x in per_round])
    metrics = {"jaxmoe_decode_tok_s": round(jd, 3), f"jaxmoe_prefill{n_prompt}_tok_s": round(jp, 3)}
    for t in types:
        lcs = [x["llama.cpp"][t] for x in per_round if t in x.get("llama.cpp", {})]
        ld, lp = _median([x["decode_tok_s"] for x in lcs]), _median([x["prefill_tok_s"] for x in lcs])
        rd, rp = _ratio(jd, ld), _ratio(jp, lp)
        metrics.update({f"llamacpp_{t}_decode_tok_s": None if ld is None else round(ld, 3),
                        f"llamacpp_{t}_prefill{n_prompt}_tok_s": None if lp is None else round(lp, 3),
                        f"ratio_decode_vs_{t}": None if rd is None else round(rd, 4),
                        f"ratio_prefill{n_prompt}_vs_{t}": None if rp is None else round(rp, 4)})
    metrics["read_gb_s"] = round(_median([x["jaxmoe"]["read_gb_s"] for x in per_round]), 2)
    metrics["threads"] = args.threads
    metrics["peer_skipped"] = peer.get("skipped")
    targets = {k.format(n=n_prompt): {"target": v, "measured": metrics.get(k.format(n=n_prompt)),
                                      "met": None if metrics.get(k.format(n=n_prompt)) is None
                                      else metrics[k.format(n=n_prompt)] >= v} for k, v in TARGETS.items()}
    details = {
        "model": name, "checkpoint": str(path), "jaxmoe_format": "fp8 (cpu_ext kernels)", "runtime": "cpu-only",
        "n_slots": engine.n_slots, "chunk_size": engine.chunk_size, "rounds": rounds, "n_prompt": n_prompt,
        "llama_bench": {"n_gen": n_gen, "reps": reps, "binary": str(peer.get("binary")), "cache": peer["cache"],
                        "gguf": {t: str(p) for t, p in peer.get("gguf", {}).items()}, "notes": peer.get("notes", []),
                        "skipped": peer.get("skipped"), "workaround_by_type": dict(workaround)},
        "llama_bench_workaround": next(iter(workaround.values()), None),
        "jaxmoe_decode": f"batch 1, median of {steps} steady steps (after {warm} warm ones) per round after a 16-token "
                         f"prompt; the preset's {engine.n_slots} slots (3 idle)",
        "jaxmoe_prefill": f"one {n_prompt}-token request, max_new_tokens=1, wall time (compiled beforehand)",
        "llama_decode": f"llama-bench tg{n_gen}: median over -r {reps} runs of {n_gen} tokens from an empty context",
        "llama_prefill": f"llama-bench pp{n_prompt}: median over -r {reps} runs",
        "ratio": "jaxmoe / llama.cpp tok/s; metrics: of the medians over rounds; per round in `per_round`",
        "read_pass": f"read-only pass over jaxmoe's native matrices of one token ({kbytes} bytes) before each engine's "
                     "turn; read_gb_s per turn in per_round",
        "targets": targets, "per_round": per_round, "compile_s": t_compile,
    }
    env = H.env_info(quick=quick, loadavg=list(os.getloadavg()), kernel_threads=int(nat.lib.jm_num_threads()),
                     machine="shared 2-core box, loaded by other engineers' runs")
    doc = H.write(args.json, metrics, env, details)
    if not quick:
        H.write(H.default_result(result_name(name) + ".json"), metrics, env, details)
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)
    engine = None
    model.close()
    if tmp is not None:
        tmp.cleanup()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
