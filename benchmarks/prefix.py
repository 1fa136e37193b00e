"""Prefix caching: time to first token when a client resends a long shared prefix, with the
paged KV cache's prefix cache and without it.

On a synthetic FP8 checkpoint (default bench-v3-mid, cached like the other benchmarks' under
$JAXMOE_CACHE_DIR or ~/.cache/jaxmoe: benchmarks/e2e.checkpoint; `demo` in a throwaway
directory with --quick), loaded once and served by two engines on the same weights, one with
`prefix_caching=True` and one with `prefix_caching=False` (RuntimeConfig; each engine has its
own block pool, so the uncached one never sees the other's blocks). Two workloads, every
request greedy with EOS ignored (replies of a fixed length), prompts of random token ids:
- chat: a system prompt, then `turns` turns; each resends the whole history (system + the
  previous user messages and this run's own replies) plus a new user message of `user`
  tokens, and generates a reply of `reply` tokens;
- agent: `calls` calls sharing a prefix of `agent_prefix` tokens (system prompt + tool list),
  each with its own suffix of `agent_suffix` tokens, `agent_new` generated tokens.
Full sizes: a 1,000-token system prompt, 5 turns of 150 + 50 tokens; 4 agent calls over a
4,000-token prefix with 100-token suffixes, 16 new tokens (4 calls, not 10: each uncached one
costs minutes on a 2-core box; --calls). --quick (demo): 256-token system prompt, 3 turns of
48 + 16; 4 calls over a 512-token prefix, 32-token suffixes, 4 new tokens.
The two engines run each turn / call back to back (alternating which goes first), one request
at a time (`Engine.submit(background=False)`, steps driven here). Before the measured pass,
a warm-up pass of the same lengths with other token ids runs on the cached engine (the two
engines share their jitted programs, so its compilations serve both; the agent's: its first
two calls): it meets the full-prompt shapes (its first request), the shapes of a cached
prefix's remainder and the decode steps. An uncached request that still meets a compilation
in the measured pass runs again at once (it keeps no state; `first_attempt` keeps the first
TTFT), so no reported TTFT includes one (`ttft_with_compiles` counts any left: 0 expected).

Per turn / call: TTFT (submit -> first token on the host), prompt tokens, cached tokens
(`Request.cached_tokens`: positions taken from the prefix cache), prompt tokens computed
(prompt - cached; and, counted independently, the non-padding positions the executor ran
before the first token), the request's wall time and its generated token ids (greedy: the two
engines' ids should be identical). Per run: prefill tokens computed, wall time (sum of the
requests'), throughput ((prompt + generated tokens) / wall time). Headline: TTFT_cached /
TTFT_uncached per turn / call from the second on, against the target <= 0.15 (`target_met`).
The machine is shared and noisy: compare the ratios within one run, not the seconds across
runs.

    python -m benchmarks.prefix [--quick] [--config NAME] [--runtime cpu-only] [--json PATH]

Results: PATH if given; a full (not --quick) run also writes benchmarks/results/prefix.json
(benchmarks/results/<class dir>/ on a CPU class other than AVX2: _harness.default_result),
prefix-<model>.json for a model other than bench-v3-mid, prefix[-<model>]-<workload>.json for one
workload alone (--workloads).
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

SIZES = {
    # full: bench-v3-mid prefills ~15-25 tok/s on the shared 2-core box, so every uncached agent call
    # (4,100 tokens) costs ~3-4 min: 4 calls, not 10, keep the run near half an hour (--calls 10 on a bigger box)
    "full": {"model": "bench-v3-mid", "system": 1000, "turns": 5, "user": 150, "reply": 50,
             "agent_prefix": 4000, "calls": 4, "agent_suffix": 100, "agent_new": 16},
    "quick": {"model": "demo", "system": 256, "turns": 3, "user": 48, "reply": 16,
              "agent_prefix": 512, "calls": 4, "agent_suffix": 32, "agent_new": 4},
}
TARGET = 0.15  # TTFT_cached / TTFT_uncached from the second turn / call on
MODES = ("cached", "uncached")


# ---- workloads --------------------------------------------------------------------------------
def chat_lengths(sz: dict) -> list[int]:
    """Prompt tokens of each chat turn."""
    return [sz["system"] + k * (sz["user"] + sz["reply"]) + sz["user"] for k in range(sz["turns"])]


def agent_lengths(sz: dict) -> list[int]:
    return [sz["agent_prefix"] + sz["agent_suffix"]] * sz["calls"]


def max_len_for(sz: dict, limit: int) -> int:
    """A power-of-two context (as benchmarks/e2e sizes it) that holds the longest request."""
    longest = max(chat_lengths(sz)[-1] + sz["reply"], agent_lengths(sz)[-1] + sz["agent_new"])
    if longest > limit:
        raise SystemExit(f"the workload needs {longest} positions; the model has {limit}")
    return min(limit, 1 << (longest - 1).bit_length())


class Workload:
    """The token ids of one pass (seeded: the warm-up pass draws other ids of the same lengths)."""

    def __init__(self, sz: dict, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        ids = lambda n: rng.integers(2, vocab, n).tolist()  # noqa: E731  (0, 1: BOS / EOS of the synthetic configs)
        self.system = ids(sz["system"])
        self.users = [ids(sz["user"]) for _ in range(sz["turns"])]
        self.prefix = ids(sz["agent_prefix"])
        self.suffixes = [ids(sz["agent_suffix"]) for _ in range(sz["calls"])]


# ---- one request --------------------------------------------------------------------------------
class Counted:
    """The engine's executor, counting the positions each call computes (padding: >= max_len)."""

    def __init__(self, engine):
        self.engine, self.inner, self.positions, self.calls = engine, engine.executor, 0, 0
        engine.executor = self

    def __call__(self, tokens, positions, *a, **kw):
        self.positions += int((np.asarray(positions) < self.engine.max_len).sum())
        self.calls += 1
        return self.inner(tokens, positions, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Compiles:
    """XLA compilations of this process (jax.monitoring's backend-compile events): count and seconds."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax  # noqa: PLC0415

        self.n, self.s = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            self.n += 1
            self.s += duration


def run_request(engine, counter: Counted, compiles: Compiles, prompt: list[int], max_new: int) -> dict:
    """One greedy request alone on the engine, EOS ignored; its figures and token ids."""
    from jaxmoe.serving.sampling import SamplingParams  # noqa: PLC0415

    counter.positions = counter.calls = 0
    n0, s0 = compiles.n, compiles.s
    req = engine.submit(prompt, max_new, SamplingParams(), eos_token_ids=(), background=False)
    while req.first_token_at is None:
        if not engine.step():
            raise RuntimeError(f"request ended without a token: {req.finish_reason}")
    computed, steps, n_first = counter.positions, counter.calls, compiles.n - n0
    engine.run_until_idle()
    assert len(req.output_ids) == max_new, (len(req.output_ids), req.finish_reason)
    return {"prompt_tokens": len(prompt), "cached_tokens": req.cached_tokens,
            "computed_tokens": len(prompt) - req.cached_tokens, "executor_prompt_positions": computed,
            "steps_to_first_token": steps, "ttft_s": req.first_token_at - req.submitted_at,
            "wall_s": req.finished_at - req.submitted_at, "generated_tokens": len(req.output_ids),
            "prefill_strategy": req.prefill_strategy, "compiles_before_first_token": n_first,
            "compiles": compiles.n - n0, "compile_s": compiles.s - s0, "output_ids": list(req.output_ids)}


def run_pair(engines: dict, compiles: Compiles, order: tuple[str, ...], prompts: dict, max_new: int) -> dict:
    """The request of each mode in `order`, back to back. An uncached request that met a compilation
    runs again (it keeps no state: the same work, the same tokens), the first attempt's TTFT kept
    beside the measured one; a cached one cannot (its blocks are cached now) and keeps its count."""
    out = {}
    for m in order:
        r = run_request(*engines[m], compiles, prompts[m], max_new)
        if m == "uncached" and r["compiles"]:
            first = r
            r = run_request(*engines[m], compiles, prompts[m], max_new)
            r["first_attempt"] = {k: first[k] for k in ("ttft_s", "wall_s", "compiles", "compile_s")}
            assert r["output_ids"] == first["output_ids"], "an uncached re-run generated other tokens"
        out[m] = r
    return out


def chat(engines: dict, compiles: Compiles, sz: dict, wl: Workload) -> dict:
    """The chat workload on the engines, turn by turn; each engine's history holds its own replies."""
    modes = [m for m in MODES if m in engines]
    history = {m: list(wl.system) for m in modes}
    turns: dict = {m: [] for m in modes}
    for k, user in enumerate(wl.users):
        got = run_pair(engines, compiles, tuple(modes if k % 2 == 0 else modes[::-1]),
                       {m: history[m] + user for m in modes}, sz["reply"])
        for m, r in got.items():
            turns[m].append(r)
            history[m] = history[m] + user + r["output_ids"]
    return turns


def agent(engines: dict, compiles: Compiles, sz: dict, wl: Workload, calls: int | None = None) -> dict:
    modes = [m for m in MODES if m in engines]
    out: dict = {m: [] for m in modes}
    for k, suffix in enumerate(wl.suffixes[:calls]):
        got = run_pair(engines, compiles, tuple(modes if k % 2 == 0 else modes[::-1]),
                       {m: wl.prefix + suffix for m in modes}, sz["agent_new"])
        for m, r in got.items():
            out[m].append(r)
    return out


# ---- figures -----------------------------------------------------------------------------------
def totals(reqs: list[dict]) -> dict:
    wall = sum(r["wall_s"] for r in reqs)
    prompt, gen = sum(r["prompt_tokens"] for r in reqs), sum(r["generated_tokens"] for r in reqs)
    return {"requests": len(reqs), "prompt_tokens": prompt, "cached_tokens": sum(r["cached_tokens"] for r in reqs),
            "prefill_tokens_computed": sum(r["computed_tokens"] for r in reqs), "generated_tokens": gen,
            "ttft_s_sum": sum(r["ttft_s"] for r in reqs), "wall_s": wall,
            "throughput_tok_s": (prompt + gen) / wall, "generated_tok_s": gen / wall}


def compare(runs: dict) -> dict:
    """Per turn / call: the TTFT ratio (from the second on), tokens computed, identical outputs."""
    c, u = runs["cached"], runs["uncached"]
    per = [{"index": i + 1, "ttft_cached_s": a["ttft_s"], "ttft_uncached_s": b["ttft_s"],
            "ttft_ratio": a["ttft_s"] / b["ttft_s"], "computed_cached": a["computed_tokens"],
            "computed_uncached": b["computed_tokens"], "same_tokens": a["output_ids"] == b["output_ids"]}
           for i, (a, b) in enumerate(zip(c, u))]
    ratios = [p["ttft_ratio"] for p in per[1:]]
    return {"per_request": per, "ratios_from_second": ratios, "ratio_max": max(ratios), "ratio_median": statistics.median(ratios),
            "target_met": all(x <= TARGET for x in ratios), "same_tokens": all(p["same_tokens"] for p in per),
            "totals": {m: totals(runs[m]) for m in MODES}}


def summary(res: dict) -> dict:
    """The headline figures of the workloads measured so far (both, once the run is complete)."""
    m: dict = {"model": res["model"], "target_ttft_ratio": TARGET}
    done = [w for w in ("chat", "agent") if w in res]
    for w in done:
        cmp_ = res[w]["compare"]
        t = cmp_["totals"]
        m[f"{w}_ttft_ratios"] = [round(x, 4) for x in cmp_["ratios_from_second"]]
        m[f"{w}_ttft_ratio_max"] = round(cmp_["ratio_max"], 4)
        m[f"{w}_ttft_ratio_median"] = round(cmp_["ratio_median"], 4)
        m[f"{w}_target_met"] = cmp_["target_met"]
        m[f"{w}_ttft_s_cached"] = [round(r["ttft_s"], 4) for r in res[w]["runs"]["cached"]]
        m[f"{w}_ttft_s_uncached"] = [round(r["ttft_s"], 4) for r in res[w]["runs"]["uncached"]]
        for mode in MODES:
            m[f"{w}_prefill_tokens_computed_{mode}"] = t[mode]["prefill_tokens_computed"]
            m[f"{w}_wall_s_{mode}"] = round(t[mode]["wall_s"], 3)
            m[f"{w}_throughput_tok_s_{mode}"] = round(t[mode]["throughput_tok_s"], 2)
        m[f"{w}_same_tokens"] = cmp_["same_tokens"]
    m["workloads"] = done  # target_met covers these
    m["target_met"] = bool(done) and all(m[f"{w}_target_met"] for w in done)
    # measured requests whose TTFT still included a compilation (after the warm-up and the uncached re-runs): 0 expected
    m["ttft_with_compiles"] = sum(r["compiles_before_first_token"] > 0 for w in done for mode in MODES
                                  for r in res[w]["runs"][mode])
    return m


# ---- the run ------------------------------------------------------------------------------------
def measure(args, sz: dict, save=None) -> dict:
    import jaxmoe  # noqa: PLC0415
    from benchmarks import e2e  # noqa: PLC0415
    from jaxmoe.serving.engine import Engine  # noqa: PLC0415

    name = args.config or sz["model"]
    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-prefix-") if args.quick and args.config is None else None
    t0 = time.perf_counter()
    path, reused = e2e.checkpoint(name, Path(tmp.name) if tmp else e2e.cache_dir())
    t_ckpt = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = jaxmoe.load(path, runtime=args.runtime, cpu_kernels=True if args.runtime == "cpu-only" else None)
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    max_len = max_len_for(sz, cfg.max_position_embeddings)
    engines = {}
    for mode in MODES:
        e = Engine(cfg, model.weights, model.runtime, max_len=max_len, prefix_caching=mode == "cached")
        engines[mode] = (e, Counted(e))
    e0 = engines["cached"][0]
    print(f"prefix: {name}, checkpoint {'reused' if reused else 'written'} ({t_ckpt:.0f} s), load {t_load:.0f} s; "
          f"runtime {args.runtime}, {e0.n_slots} slots, chunk {e0.chunk_size}, kv block {e0.blocks.block_size}, "
          f"max_len {max_len}; chat turns {chat_lengths(sz)} prompt tokens, agent {sz['calls']} x "
          f"{agent_lengths(sz)[0]}", flush=True)

    # Warm-up: the same lengths with other ids on the cached engine (the engines' jitted programs are
    # shared: their compilations serve both): its first request compiles the full-prompt shapes, the
    # later ones the shapes of a cached prefix's remainder, and the decode steps. The agent's calls
    # after the second repeat its shapes. Shapes only the uncached engine meets compile in the
    # measured pass, and run_pair re-runs those requests.
    compiles = Compiles()
    t0 = time.perf_counter()
    warm = Workload(sz, cfg.vocab_size, seed=1)
    only_cached = {"cached": engines["cached"]}
    if "chat" in args.workloads:
        chat(only_cached, compiles, sz, warm)
    if "agent" in args.workloads:
        agent(only_cached, compiles, sz, warm, calls=2)
    t_warm = time.perf_counter() - t0
    print(f"prefix: warm-up {t_warm:.0f} s ({compiles.n} compilations, {compiles.s:.0f} s)", flush=True)

    wl = Workload(sz, cfg.vocab_size, seed=0)
    out: dict = {"model": name, "checkpoint": str(path), "runtime": args.runtime, "n_slots": e0.n_slots,
                 "chunk_size": e0.chunk_size, "kv_block_size": e0.blocks.block_size, "max_len": max_len, "sizes": sz,
                 "chat_prompt_tokens": chat_lengths(sz), "agent_prompt_tokens": agent_lengths(sz),
                 "load_s": t_load, "checkpoint_s": t_ckpt, "warmup_s": t_warm, "warmup_compiles": compiles.n,
                 "warmup_compile_s": compiles.s}
    for w, fn in [(w, fn) for w, fn in (("chat", chat), ("agent", agent)) if w in args.workloads]:
        t0 = time.perf_counter()
        runs = fn(engines, compiles, sz, wl)
        out[w] = {"runs": runs, "compare": compare(runs), "elapsed_s": time.perf_counter() - t0}
        for p in out[w]["compare"]["per_request"]:
            print(f"{w} {p['index']:2d}: TTFT cached {p['ttft_cached_s']:.3f} s ({p['computed_cached']} tokens computed), "
                  f"uncached {p['ttft_uncached_s']:.3f} s ({p['computed_uncached']}), ratio {p['ttft_ratio']:.3f}"
                  f"{'' if p['same_tokens'] else ', TOKENS DIFFER'}", flush=True)
        if save is not None:
            save(out)  # the finished workloads are on disk if a later one is cut short
    for e, c in engines.values():
        e.executor = c.inner
    engines.clear()
    model.close()
    if tmp is not None:
        tmp.cleanup()
    return out


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="jaxmoe/configs/models name (default bench-v3-mid; demo with --quick)")
    ap.add_argument("--runtime", default="cpu-only", help="runtime preset (jaxmoe/configs/runtime; default cpu-only)")
    for k, what in (("system", "chat system prompt tokens"), ("turns", "chat turns"), ("user", "tokens per user message"),
                    ("reply", "tokens per reply"), ("agent-prefix", "agent shared prefix tokens"), ("calls", "agent calls"),
                    ("agent-suffix", "agent suffix tokens per call"), ("agent-new", "agent generated tokens per call")):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"{what} (default: full / --quick sizes)")
    ap.add_argument("--workloads", default="chat,agent", help="comma-separated subset of chat,agent")
    args = ap.parse_args(argv)
    args.workloads = [w for w in ("chat", "agent") if w in args.workloads.split(",")]
    if not args.workloads:
        raise SystemExit("--workloads: chat, agent or both")
    sz = dict(SIZES["quick" if args.quick else "full"])
    for k in sz:
        v = getattr(args, k.replace("-", "_"), None)
        if v is not None and k != "model":
            sz[k] = v
    if sz["turns"] < 2 or sz["calls"] < 2:
        raise SystemExit("at least 2 turns and 2 calls: the ratios start at the second")

    env = H.env_info(quick=args.quick, loadavg=list(os.getloadavg()))
    notes = {
        "ttft_s": "Request.submitted_at -> first_token_at: submit, scheduling, the prompt's steps, the first token on the host",
        "computed_tokens": "prompt_tokens - cached_tokens; executor_prompt_positions counts the non-padding positions the "
                           "executor ran before the first token (the same figure, measured)",
        "order": "the two engines run each turn / call back to back, the cached one first on odd turns, second on even",
        "warmup": "a pass of the same lengths with other token ids on the cached engine (the engines share their compiled "
                  "programs; agent: two calls) compiled the step shapes first; an uncached request that still met a "
                  "compilation ran again at once (first_attempt); compiles_before_first_token counts what is left",
        "throughput_tok_s": "(prompt + generated tokens) / the sum of the requests' wall times",
        "same_tokens": "greedy: the cached and uncached runs' generated ids per turn / call should be identical"}
    paths = [args.json] if args.json else []
    if not args.quick:
        model = args.config or SIZES["full"]["model"]
        tags = ([] if model == SIZES["full"]["model"] else [model]) + ([] if len(args.workloads) == 2 else args.workloads)
        paths.append(H.default_result("-".join(["prefix", *tags]) + ".json"))

    def save(res: dict) -> dict:
        env["loadavg"] = list(os.getloadavg())
        doc = {}
        for p in paths or [None]:
            doc = H.write(p, summary(res), env, {"results": res, "notes": notes})
        return doc

    doc = save(measure(args, sz, save))
    metrics = doc["metrics"]
    for p in paths:
        print(f"wrote {p}", flush=True)
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
