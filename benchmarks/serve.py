"""Serving load test: `jaxmoe serve` as a user runs it, driven over HTTP by the official
`openai` client.

On a synthetic FP8 checkpoint (cached like the other benchmarks' under $JAXMOE_CACHE_DIR or
~/.cache/jaxmoe; default `demo`, `tiny` with --quick), the server runs as a subprocess
(`python -m jaxmoe.cli serve --model PATH --port <free port>`, its default runtime and slots;
stdout/stderr to a log file) until GET /health answers 200. Then, for each N in --clients,
a round of N concurrent client threads, each sending its requests one after the other
(closed loop; at least `requests_per_round` requests per round in all): streamed
`/v1/completions` with a prompt of --prompt-tokens random token ids, greedy
(temperature 0), `max_tokens` = --max-tokens and the server's `ignore_eos` extension (so
every request generates exactly max_tokens tokens), `stream_options.include_usage` (the
token count). Per request:
- TTFT: request sent -> first chunk with text;
- TPOT: (the chunk that ends the request - the first text chunk) / (completion tokens - 1),
  completion tokens from the usage chunk (a chunk may carry several tokens, and a token
  whose text is not complete yet carries none);
- per round: p50/p99 of both over its requests, output tok/s = completion tokens / the
  round's wall time (first request sent -> last one done), and the gaps between text chunks
  (ITL) p50/p99.
A warm-up first: at every N, rounds of two requests per client until one compiles nothing
(the server runs with JAX_LOG_COMPILES=1 and its log is counted; at most `warmup_rounds`):
which step shapes a round meets depends on when its requests arrive (prompt chunks of
several requests in one step, beside decoding rows or not). Each measured round reports the
compilations it still met (`server_compiles`, normally 0).

Each measured round is paired with a read-only bandwidth pass (benchmarks/_harness.read_pass_fn
over the native matrices one decoded token reads, the model loaded a second time in this
process as benchmarks/e2e does) run right before and right after it while the server is idle:
`read_gb_s`, and at one client the decode fraction of the bandwidth bound
(benchmarks/e2e.bytes_per_token / read pass) / TPOT p50, compare across runs; the times alone
do not (the machine is shared). The clients share the cores with the server: each round
records both processes' CPU seconds (`cpu_s`).

    python -m benchmarks.serve [--quick] [--json PATH] [--model demo] [--clients 1,2,4,8]
                               [--max-tokens N] [--prompt-tokens N] [--n-slots N]
    python -m benchmarks.serve --model bench-v3-mid      # DeepSeek-V3 layer sizes (a bigger box)
    python -m benchmarks.serve --render PATH.json        # the plot only

Results: PATH if given; a full (not --quick) run also writes benchmarks/results/serve.json
(benchmarks/results/<class dir>/ on a CPU class other than AVX2: _harness.default_result),
serve-<model>.json for a model other than demo. The plot (TTFT and TPOT p50/p99 and output
tok/s against N) goes beside each JSON as <name>.png.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import _harness as H

SIZES = {
    # demo: ~150 tok/s at batch 1 on the 2-core box; the full run (start, warm-up, 4 rounds) takes ~2-3 min there
    "full": {"model": "demo", "clients": [1, 2, 4, 8], "prompt_tokens": 256, "max_tokens": 128, "requests_per_round": 16,
             "read_repeats": 5, "warmup_rounds": 4},
    "quick": {"model": "tiny", "clients": [1, 2], "prompt_tokens": 16, "max_tokens": 8, "requests_per_round": 2,
              "read_repeats": 2, "warmup_rounds": 3},
}
STARTUP_TIMEOUT_S = 900.0  # load + placement of the checkpoint in the server (bench-v3-mid takes minutes)
LOG_TAIL = 4000
COMPILE_LINE = "Finished XLA compilation of"  # what JAX logs per compilation under JAX_LOG_COMPILES=1
JAX_LOG_LINES = ("Finished ", "Compiling ")  # JAX's compile log, left out of server_log_tail


class ServerError(RuntimeError):
    """The server did not come up (or died): the message carries its log's tail."""


# ---- statistics -------------------------------------------------------------------------------
def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p99": None, "mean": None, "min": None, "max": None, "n": 0}
    a = np.asarray(xs, float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": len(xs)}


def _ms(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{1e3 * x:.{nd}f}"


# ---- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, n: int = LOG_TAIL) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"(no log: {e})"


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Server:
    """`python -m jaxmoe.cli serve` as a subprocess; a context manager that stops it (SIGTERM,
    then SIGKILL after `stop_timeout`) however the block ends."""

    def __init__(self, model: Path, name: str, log: Path, *, n_slots: int | None = None, max_queue: int = 64,
                 startup_timeout: float = STARTUP_TIMEOUT_S, stop_timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.log = name, log
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.cmd = [sys.executable, "-m", "jaxmoe.cli", "serve", "--model", str(model), "--port", str(self.port),
                    "--served-model-name", name, "--max-queue", str(max_queue), "--shutdown-timeout", "5",
                    "--log-level", "warning"] + (["--n-slots", str(n_slots)] if n_slots else [])
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:  # JAX_LOG_COMPILES: each compilation is a log line (compiles())
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "JAX_LOG_COMPILES": "1"})
        return self

    def compiles(self) -> int:
        """XLA compilations the server has logged so far (a measured round should see none)."""
        try:
            return self.log.read_text(errors="replace").count(COMPILE_LINE)
        except OSError:
            return 0

    def wait_healthy(self) -> float:
        """Seconds until GET /health answered 200; ServerError if the process ends first or
        `startup_timeout` passes."""
        import httpx  # noqa: PLC0415  (the client side only: --render needs neither it nor jaxmoe)

        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"the server exited with status {code} before answering /health "
                                  f"({' '.join(self.cmd)}); log {self.log}, its tail:\n{_tail(self.log)}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise ServerError(f"the server did not answer GET /health with 200 within {self.startup_timeout:.0f} s "
                                  f"({' '.join(self.cmd)}); log {self.log}, its tail:\n{_tail(self.log)}")
            time.sleep(0.5)

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the server's /metrics (Prometheus text)."""
        import httpx  # noqa: PLC0415  (see wait_healthy)

        for line in httpx.get(self.url + "/metrics", timeout=10.0).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def cpu_s(self) -> float | None:
        """The server process's CPU seconds so far (user + system, /proc; None elsewhere)."""
        return proc_cpu_s(self.proc.pid) if self.proc is not None else None

    def stop(self) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the clients ------------------------------------------------------------------------------
def one_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion; its timings (perf_counter seconds, relative to its start)."""
    t0 = time.perf_counter()
    out: dict = {"prompt_tokens": len(prompt), "t_start": t0}
    text_times: list[float] = []
    t_end, finish, usage = None, None, None
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            t = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.text:
                    text_times.append(t)
                if c.finish_reason is not None:
                    finish, t_end = c.finish_reason, t
    except Exception as e:  # recorded: the round reports its failed requests
        out["error"] = f"{type(e).__name__}: {e}"
    t_done = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(text_times)
    t_end = t_end or (text_times[-1] if text_times else None)
    out.update({"t_done": t_done, "latency_s": t_done - t0, "completion_tokens": tokens, "chunks": len(text_times),
                "finish_reason": finish, "usage_reported": usage is not None,
                "ttft_s": text_times[0] - t0 if text_times else None,
                "tpot_s": (t_end - text_times[0]) / (tokens - 1) if text_times and t_end and tokens > 1 else None,
                "itl_s": [b - a for a, b in zip(text_times, text_times[1:])]})
    return out


def run_round(url: str, model: str, n_clients: int, per_client: int, prompt_tokens: int, max_tokens: int, vocab: int,
              seed: int) -> dict:
    """n_clients threads, each with its own openai client, started together, each sending
    `per_client` requests one after the other."""
    import openai  # noqa: PLC0415  (the client side only)

    rng = np.random.default_rng(seed)
    prompts = [[rng.integers(2, vocab, prompt_tokens).tolist() for _ in range(per_client)] for _ in range(n_clients)]
    results: list[list[dict]] = [[] for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1, timeout=120)  # a client that fails to start breaks it

    def client_main(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600.0)
        try:
            barrier.wait()
            for p in prompts[i]:
                r = one_request(client, model, p, max_tokens)
                r["client"] = i
                results[i].append(r)
        finally:
            client.close()

    threads = [threading.Thread(target=client_main, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    reqs = [r for rs in results for r in rs]
    wall = max((r["t_done"] for r in reqs), default=time.perf_counter()) - t0  # from the round's start to the last request's end
    ok = [r for r in reqs if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "clients": n_clients, "requests_per_client": per_client, "requests": len(reqs), "failed": len(reqs) - len(ok),
        "errors": sorted({r["error"] for r in reqs if "error" in r})[:5],
        "not_max_tokens": sum(r["completion_tokens"] != max_tokens for r in ok),
        "wall_s": wall, "completion_tokens": tokens, "output_tok_s": tokens / wall,
        "ttft_s": percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "tpot_s": percentiles([r["tpot_s"] for r in ok if r["tpot_s"] is not None]),
        "itl_s": percentiles([g for r in ok for g in r["itl_s"]]),
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "per_request": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("itl_s", "t_start", "t_done")} | {"start_s": round(r["t_start"] - t0, 6)}
                        for r in reqs],
    }


def per_client(n: int, total: int, quick: bool) -> int:
    return max(1 if quick else 2, math.ceil(total / n))


# ---- the read pass ----------------------------------------------------------------------------
class ReadPass:
    """A read-only pass over the native matrices one decoded token reads (benchmarks/e2e), on a
    copy of the model placed in this process."""

    def __init__(self, path: Path):
        import jaxmoe  # noqa: PLC0415  (heavy: only when measuring)
        from benchmarks import e2e  # noqa: PLC0415  (its helpers load JAX and the native library)
        from jaxmoe.cpu._lib import load as load_native  # noqa: PLC0415  (see above)

        self.model = jaxmoe.load(path, runtime="cpu-only", cpu_kernels=True)
        cfg = self.model.cfg
        e2e.TOP_K[0] = cfg.num_experts_per_tok
        nat = load_native()
        mats, _, _ = e2e.token_matrices(self.model.weights, nat)
        self.run = e2e.read_fn(nat, mats)
        self.bytes = e2e.matrix_bytes(nat, mats)
        self.n_matrices = len(mats)
        self.bytes_per_token = e2e.bytes_per_token(cfg)["total"]
        self.vocab = cfg.vocab_size

    def __call__(self, repeats: int) -> list[float]:
        self.run()  # warm
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.run()
            ts.append(time.perf_counter() - t0)
        return ts

    def close(self) -> None:
        self.model.close()


# ---- measuring --------------------------------------------------------------------------------
def measure(args, sz: dict) -> dict:
    from benchmarks import e2e  # noqa: PLC0415  (checkpoint cache; imports jaxmoe)

    name = sz["model"]
    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-serve-") if args.quick and args.model is None else None
    try:
        root = Path(tmp.name) if tmp else e2e.cache_dir()
        t0 = time.perf_counter()
        path, reused = e2e.checkpoint(name, root)
        t_ckpt = time.perf_counter() - t0
        log = Path(tempfile.gettempdir()) / f"jaxmoe-serve-bench-{os.getpid()}.log"
        server = Server(path, name, log, n_slots=args.n_slots)
        out: dict = {"model": name, "checkpoint": str(path), "checkpoint_reused": reused, "checkpoint_s": t_ckpt,
                     "server_cmd": server.cmd, "server_log": str(log), "sizes": sz}
        print(f"serve: {name}: checkpoint {'reused' if reused else 'written'} ({t_ckpt:.0f} s) {path}; starting the server "
              f"on port {server.port} (log {log})", flush=True)
        with server:
            t0 = time.perf_counter()
            reader = ReadPass(path)  # loads while the server starts
            out["read_pass_load_s"] = time.perf_counter() - t0
            out["server_start_s"] = server.wait_healthy()
            out["n_slots"] = int(server.metric("jaxmoe_cache_slots") or 0) or None
            out.update({"read_pass_bytes": reader.bytes, "read_pass_matrices": reader.n_matrices,
                        "bytes_per_token": reader.bytes_per_token})
            print(f"serve: healthy after {out['server_start_s']:.0f} s, {out['n_slots']} slots", flush=True)
            try:
                out["warmup"] = []
                t0, comp0 = time.perf_counter(), server.compiles()
                for n in sz["clients"]:
                    # Which step shapes a round meets depends on when its requests arrive (prefill chunks of
                    # several prompts at once, beside decoding rows or not): warm up at this N until a round
                    # compiles nothing, at most warmup_rounds times.
                    for attempt in range(sz["warmup_rounds"]):
                        c = server.compiles()
                        r = run_round(server.url, name, n, 2, sz["prompt_tokens"], sz["max_tokens"], reader.vocab,
                                      seed=1000 * (attempt + 1) + n)
                        w = {k: r[k] for k in ("clients", "requests", "failed", "errors", "wall_s")}
                        out["warmup"].append(w | {"compiles": server.compiles() - c})
                        if out["warmup"][-1]["compiles"] == 0:
                            break
                out["warmup_s"] = time.perf_counter() - t0
                out["warmup_compiles"], out["startup_compiles"] = server.compiles() - comp0, comp0
                print(f"serve: warm-up {out['warmup_s']:.0f} s, {out['warmup_compiles']} compiles", flush=True)
                out["rounds"] = []
                for n in sz["clients"]:
                    k = per_client(n, sz["requests_per_round"], args.quick)
                    before = reader(sz["read_repeats"])
                    cpu0, own0, comp0 = server.cpu_s(), time.process_time(), server.compiles()
                    r = run_round(server.url, name, n, k, sz["prompt_tokens"], sz["max_tokens"], reader.vocab, seed=n)
                    cpu1, own1 = server.cpu_s(), time.process_time()
                    r["server_compiles"] = server.compiles() - comp0
                    after = reader(sz["read_repeats"])
                    r["cpu_s"] = {"server": None if cpu0 is None or cpu1 is None else cpu1 - cpu0, "clients": own1 - own0,
                                  "cores": os.cpu_count()}
                    rs = percentiles(before + after)
                    r["read_pass"] = {"s": rs, "gb_s": reader.bytes / rs["p50"] / 1e9,
                                      "gb_s_before": reader.bytes / float(np.median(before)) / 1e9,
                                      "gb_s_after": reader.bytes / float(np.median(after)) / 1e9}
                    out["rounds"].append(r)
                    print(f"serve: {n} clients x {k}: TTFT p50 / p99 {_ms(r['ttft_s']['p50'], 0)} / {_ms(r['ttft_s']['p99'], 0)} "
                          f"ms; TPOT p50 / p99 {_ms(r['tpot_s']['p50'])} / {_ms(r['tpot_s']['p99'])} ms; "
                          f"{r['output_tok_s']:.1f} tok/s; read pass {r['read_pass']['gb_s']:.1f} GB/s; "
                          f"{r['server_compiles']} compiles; failed {r['failed']}",
                          flush=True)
            finally:
                reader.close()
        out["server_exit_code"] = server.exit_code
        lines = _tail(log, 1_000_000).splitlines()
        out["server_log_tail"] = "\n".join(x for x in lines if not x.startswith(JAX_LOG_LINES))[-2000:]
        log.unlink(missing_ok=True)  # kept only when the server failed (the error names it)
        out.pop("server_log")
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def summary(res: dict) -> dict:
    """The headline figures (metrics) of a measured result."""
    m: dict = {"model": res["model"], "clients": [r["clients"] for r in res["rounds"]],
               "prompt_tokens": res["sizes"]["prompt_tokens"], "max_tokens": res["sizes"]["max_tokens"],
               "n_slots": res.get("n_slots")}
    for r in res["rounds"]:
        n = r["clients"]
        for what in ("ttft", "tpot"):
            for p in ("p50", "p99"):
                v = r[f"{what}_s"][p]
                m[f"{what}_{p}_s_c{n}"] = None if v is None else round(v, 5)
        m[f"output_tok_s_c{n}"] = round(r["output_tok_s"], 2)
        m[f"read_gb_s_c{n}"] = round(r["read_pass"]["gb_s"], 2)
    m["read_gb_s"] = round(float(np.median([r["read_pass"]["gb_s"] for r in res["rounds"]])), 2)
    first = res["rounds"][0]
    if first["clients"] == 1 and first["tpot_s"]["p50"]:
        bound = res["bytes_per_token"] / (first["read_pass"]["gb_s"] * 1e9)
        m["decode_frac_of_read_c1"] = round(bound / first["tpot_s"]["p50"], 4)
    m["failed_requests"] = sum(r["failed"] for r in res["rounds"])
    return m


# ---- the plot ---------------------------------------------------------------------------------
def render(doc: dict, png: Path) -> Path:
    """TTFT and TPOT p50/p99 and output tok/s against the number of clients, one PNG."""
    import matplotlib  # noqa: PLC0415  (drawing only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after the backend is chosen)

    res, e = doc["details"]["results"], doc["env"]
    rounds = res["rounds"]
    n = [r["clients"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, what, label in ((axes[0], "ttft_s", "time to first token (ms)"), (axes[1], "tpot_s", "time per output token (ms)")):
        for p, style in (("p50", "-o"), ("p99", "--s")):
            ax.plot(n, [1e3 * (r[what][p] or math.nan) for r in rounds], style, label=p)
        ax.set_ylabel(label)
    axes[2].plot(n, [r["output_tok_s"] for r in rounds], "-o", label="output tok/s (all clients)")
    axes[2].plot(n, [r["output_tok_s"] / r["clients"] for r in rounds], "--s", label="per client")
    axes[2].set_ylabel("output tok/s")
    rd = ", ".join(f"{r['read_pass']['gb_s']:.0f}" for r in rounds)
    slots = res.get("n_slots")
    for ax in axes:
        if slots and min(n) < slots <= max(n):  # beyond it, requests wait for a cache slot
            ax.axvline(slots, color="grey", lw=1, ls=":", label=f"{slots} cache slots")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"jaxmoe serve: {res['model']} FP8, {res.get('n_slots')} slots, prompt {res['sizes']['prompt_tokens']} / "
                 f"{res['sizes']['max_tokens']} output tokens; {e.get('cpu', '?')} x{e.get('cores', '?')} "
                 f"({e.get('date', '')[:10]}); read pass GB/s per round: {rd}", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ---- command line -----------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="jaxmoe/configs/models name (default demo; tiny with --quick)")
    ap.add_argument("--clients", default=None, help="concurrent clients per round, comma-separated (default 1,2,4,8)")
    ap.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 128; 8 with --quick)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt tokens per request (default 256; 16 with --quick)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per round at least (each client sends ceil(this / N), at least 2; default 16)")
    ap.add_argument("--n-slots", type=int, default=None, help="the server's --n-slots (default: its runtime preset's)")
    ap.add_argument("--render", metavar="JSON", default=None, help="only draw the plot of a result (beside it)")
    args = ap.parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        print(f"wrote {render(doc, Path(args.render).with_suffix('.png'))}", flush=True)
        return doc
    sz = dict(SIZES["quick" if args.quick else "full"])
    sz["model"] = args.model or sz["model"]
    if args.clients:
        sz["clients"] = [int(x) for x in args.clients.split(",") if x.strip()]
    for key, v in (("max_tokens", args.max_tokens), ("prompt_tokens", args.prompt_tokens),
                   ("requests_per_round", args.requests), ("read_repeats", args.repeats)):
        if v is not None:
            sz[key] = v
    if not sz["clients"] or min(sz["clients"]) < 1 or sz["max_tokens"] < 2 or sz["prompt_tokens"] < 1:
        ap.error("--clients must be positive integers, --max-tokens >= 2 (TPOT needs two tokens), --prompt-tokens >= 1")
    try:
        res = measure(args, sz)
    except ServerError as e:
        print(f"serve: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    env = H.env_info(quick=args.quick, loadavg=list(os.getloadavg()),
                     machine="shared 2-core box, loaded by other engineers' runs")
    details = {"results": res, "notes": {
        "requests": "streamed POST /v1/completions through the openai client (one client object per thread): a prompt of "
                    "prompt_tokens random token ids, temperature 0, max_tokens, ignore_eos (server extension), "
                    "stream_options.include_usage; each client sends its requests one after the other",
        "ttft": "request sent -> first chunk carrying text, client side (includes HTTP, queueing for a slot, prefill)",
        "tpot": "(chunk with finish_reason - first text chunk) / (usage.completion_tokens - 1), per request",
        "itl": "gaps between consecutive text chunks, all requests of a round",
        "output_tok_s": "completion tokens of the round / its wall time (first request sent -> last one done)",
        "read_pass": "read-only pass over the native matrices one decoded token reads (benchmarks/e2e.token_matrices) "
                     "on a second copy of the model in the benchmark process, read_repeats times right before and "
                     "right after each round while the server is idle; gb_s = bytes / median",
        "decode_frac_of_read_c1": "(bytes_per_token from benchmarks/e2e.bytes_per_token / read pass) / TPOT p50 at one "
                                  "client: the e2e benchmark's decode_frac_of_read_b1 seen through HTTP",
        "cpu_s": "CPU seconds during each round of the server process (/proc) and of this process (its client "
                 "threads: the openai client parsing the streams), on the same cores: compare with cores x wall_s",
        "server_compiles": "XLA compilations the server logged (JAX_LOG_COMPILES=1) during each round: 0 = the "
                           "warm-up compiled every step shape the round used",
        "warmup": "before the measured rounds, at every N: rounds of two requests per client until one compiles "
                  "nothing (at most sizes.warmup_rounds); the step shapes met depend on the arrival times",
        "sizes": "full run: prompt 256 / 128 output tokens, >= 16 requests per round keep it to a few minutes on the "
                 "2-core box (server start and warm-up included)"}}
    doc = H.write(None, summary(res), env, details)
    paths = [Path(args.json)] if args.json else []
    if not args.quick:
        paths.append(H.default_result("serve.json" if sz["model"] == "demo" else f"serve-{sz['model']}.json"))
    for p in dict.fromkeys(p.resolve() for p in paths):
        H.write(p, doc["metrics"], doc["env"], doc["details"])
        print(f"wrote {p} and {render(doc, p.with_suffix('.png'))}", flush=True)
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in doc["metrics"].items()), flush=True)
    if doc["metrics"]["failed_requests"]:
        print(f"serve: {doc['metrics']['failed_requests']} requests failed: "
              + "; ".join(e for r in res["rounds"] for e in r["errors"]), file=sys.stderr, flush=True)
        sys.exit(1)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
