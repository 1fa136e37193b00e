"""Generate the notebooks of this folder (without outputs): `python notebooks/build.py`.

The .ipynb files are committed; edit the cells here and re-run this script, so the notebooks
stay reproducible and diffable. tests/notebooks/test_notebooks.py executes each of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# A cell is a markdown string starting with "md:" or a code string.
SETUP_CHECKPOINT = """\
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxmoe
from jaxmoe.loading.synthetic import write_synthetic_checkpoint

# Checkpoints go to $JAXMOE_CACHE_DIR (the test suite points it to a temp dir), else a temp dir.
root = Path(os.environ.get("JAXMOE_CACHE_DIR") or tempfile.mkdtemp(prefix="jaxmoe-nb-"))
cfg = jaxmoe.ModelConfig.named("tiny")
t0 = time.perf_counter()
path = write_synthetic_checkpoint(root / "tiny-fp8", cfg, fmt="fp8", overwrite=True)
print(f"wrote {path} in {time.perf_counter() - t0:.2f} s:", sorted(p.name for p in path.iterdir()))"""

QUICKSTART = [
    """md:# jaxmoe quickstart

jaxmoe runs DeepSeek-V3-family Mixture-of-Experts models on JAX/XLA. This notebook uses a
*synthetic* checkpoint (random weights in the real DeepSeek-V3 layout, FP8 linears, a small
tokenizer) of the `tiny` config, so it runs anywhere in seconds. The generated text is
random-looking: the weights are random. Swap `path` for a real checkpoint directory and the
same calls apply.""",
    "md:## 1. Write a synthetic checkpoint",
    SETUP_CHECKPOINT,
    """md:## 2. Load it

`jaxmoe.load` reads `config.json` + safetensors (FP8 weights stay FP8), the tokenizer, and
picks a runtime preset (`cpu-only` here without a GPU). `max_seq_len` caps the context
(prompt + generated tokens) and so the KV-cache memory.""",
    """\
t0 = time.perf_counter()
model = jaxmoe.load(path, max_seq_len=128)
print(f"loaded in {time.perf_counter() - t0:.2f} s")
print(model)
print("layers:", model.cfg.num_hidden_layers, "| routed experts:", model.cfg.n_routed_experts,
      "| experts per token:", model.cfg.num_experts_per_tok, "| vocab:", model.cfg.vocab_size)
print("runtime preset:", model.runtime.preset, "| cache slots:", model.runtime.n_slots)
print("CPU kernels (cpu_ext) in use:", model.cpu_kernels, "| context:", model.context_len)""",
    """md:## 3. Generate

`generate` returns the text, the generated token ids, why it stopped and timings. The first
call compiles the step programs; `model.compile(n)` can warm them ahead of time.""",
    """\
print(f"compiled in {model.compile(prompt_tokens=8):.2f} s")
result = jaxmoe.generate(model, "Hello, world", max_new_tokens=16)
print("text:         ", repr(result.text))
print("prompt ids:   ", result.prompt_token_ids)
print("token ids:    ", result.token_ids)
print("finish_reason:", result.finish_reason)
t = result.timings
print(f"TTFT {t.ttft_s * 1e3:.1f} ms | prefill {t.prefill_tok_s:.0f} tok/s | decode {t.decode_tok_s:.1f} tok/s "
      f"| {t.prompt_tokens} prompt + {t.generated_tokens} generated tokens")""",
    "md:A prompt can also be token ids (no tokenizer needed):",
    """\
ids_result = jaxmoe.generate(model, [1, 17, 42, 99], max_new_tokens=8, ignore_eos=True)
print(ids_result.token_ids, ids_result.finish_reason)
assert len(ids_result.token_ids) == 8 and ids_result.finish_reason == "length\"""",
    """md:## 4. Stream

`stream_generate` yields one `StreamResponse` per token: its id, the text it completes (can be
empty while a multi-byte character is incomplete), the running timings; the last one has
`finish_reason` set. `generate` is exactly the join of the stream.""",
    """\
pieces = []
for r in jaxmoe.stream_generate(model, "Hello, world", max_new_tokens=16):
    pieces.append(r.text)
    print(f"{r.token_id:4d} {r.text!r:12} {r.finish_reason or ''}")
assert "".join(pieces) == result.text  # greedy: the same tokens as generate above""",
    """md:## 5. Sampling options

`temperature=0` (the default) is greedy. With a temperature, `top_k` / `top_p` filter the
distribution and `seed` makes the draw reproducible (per request: what else runs in the same
batch does not change it). `stop` ends generation at a stop string (not part of the text).""",
    """\
opts = dict(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, ignore_eos=True)
a = jaxmoe.generate(model, "Once upon a time", seed=1, **opts)
b = jaxmoe.generate(model, "Once upon a time", seed=1, **opts)
c = jaxmoe.generate(model, "Once upon a time", seed=2, **opts)
print("seed 1:", a.token_ids)
print("seed 1:", b.token_ids)
print("seed 2:", c.token_ids)
assert a.token_ids == b.token_ids""",
    """\
# A stop string: take a piece of the greedy text above, so that it certainly occurs.
full = jaxmoe.generate(model, "Hello, world", max_new_tokens=16, ignore_eos=True)
half = full.text[len(full.text) // 2:]
stop = next((half[i:i + 2] for i in range(len(half) - 1) if half[i:i + 2].isascii() and half[i:i + 2].isprintable()), half[:2]) or "\\n"
stopped = jaxmoe.generate(model, "Hello, world", max_new_tokens=16, ignore_eos=True, stop=[stop])
print(f"full:    {full.text!r}")
print(f"stop={stop!r}: {stopped.text!r} ({stopped.finish_reason})")""",
    """md:## 6. Chat messages

`messages` applies the checkpoint's chat template (instead of `prompt`).""",
    """\
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a mixture of experts?"},
]
chat_ids = model.tokenizer.encode_chat(messages)
print(f"{len(chat_ids)} prompt tokens: {model.tokenizer.decode(chat_ids)[:200]!r}")
reply = jaxmoe.generate(model, messages=messages, max_new_tokens=12)
print(repr(reply.text), reply.finish_reason)""",
    """\
model.close()  # frees the native memory of the CPU-kernel weights now""",
]

ARCHITECTURE = [
    """md:# One token through the model

jaxmoe's model is a set of pure functions of (weights, cache, tokens, positions) in
`jaxmoe.model`: `forward` (embeddings, decoder layers, final logits), `mla` (multi-head
latent attention), `router` (DeepSeek-V3's group-limited sigmoid top-k), `moe` (routed + shared
experts) and `cache` (the compressed latent KV cache). This notebook prefills a prompt, then
walks the next token through each stage by hand, checks the result against
`forward.decode`, and ends with the serving engine batching several requests.""",
    SETUP_CHECKPOINT,
    """\
import jax
import jax.numpy as jnp

from jaxmoe.model import cache as kvcache
from jaxmoe.model import forward, moe, router
from jaxmoe.model.weights import MoEWeights

MAX_LEN = 64
model = jaxmoe.load(path, max_seq_len=MAX_LEN)
cfg, W = model.cfg, model.weights
print("backend:", jax.default_backend(), "| runtime preset:", model.runtime.preset)
for i, lw in enumerate(W.layers):
    kind = "MoE" if isinstance(lw.mlp, MoEWeights) else "dense MLP"
    where = ""
    if isinstance(lw.mlp, MoEWeights):
        where = f" -- routed experts: {type(lw.mlp.experts).__module__}.{type(lw.mlp.experts).__name__}"
    print(f"layer {i}: MLA + {kind}{where}")""",
    """md:The routed experts' type says where they run: `HostExperts` lives in host memory and
runs through jaxmoe's native CPU kernels (cpu_ext, an XLA FFI call), `ExpertsWeights` is
a plain JAX pytree on the default device.

## Prefill the prompt""",
    """\
def timed(fn, *args, repeats=5, **kw):
    \"\"\"(result, first call s (compiles), median s of the next calls).\"\"\"
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kw))
        ts.append(time.perf_counter() - t0)
    return out, first, float(np.median(ts))

prompt = model.tokenizer.encode("The quick brown fox")
T = len(prompt)
prefill_j = jax.jit(forward.prefill, static_argnums=0)
cache0 = kvcache.init_cache(cfg, 1, MAX_LEN, model.dtype)
(logits, cache), first, med = timed(prefill_j, cfg, W, cache0, jnp.array([prompt]), jnp.arange(T)[None])
token = int(logits[0, -1].argmax())
print(f"prompt {prompt} ({T} tokens): prefill {med * 1e3:.2f} ms (first call, compiling: {first:.2f} s)")
print("next token:", token, repr(model.tokenizer.decode([token])))""",
    """md:## The latent KV cache

MLA caches, per layer and position, only `c_kv` (the compressed latent, `kv_lora_rank` wide)
and `k_pe` (the shared rotary key, `qk_rope_head_dim` wide); the per-head keys and values
are re-derived from them. An expanded cache would hold every head's key and value.""",
    """\
print("c_kv:", cache.c_kv.shape, cache.c_kv.dtype, "  [layers, batch, positions, kv_lora_rank]")
print("k_pe:", cache.k_pe.shape, cache.k_pe.dtype, "  [layers, batch, positions, qk_rope_head_dim]")
filled = np.asarray(jnp.abs(cache.c_kv[0, 0]).sum(-1) > 0)
print("positions written in layer 0:", np.flatnonzero(filled).tolist())

def per_token_bytes(c, itemsize=2):
    latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * itemsize
    expanded = c.num_hidden_layers * c.num_attention_heads * (
        c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * itemsize
    return latent, expanded

for name in ("tiny", "deepseek-v3"):
    latent, expanded = per_token_bytes(jaxmoe.ModelConfig.named(name))
    print(f"{name:12} bf16 cache per token: latent {latent:>9,} B vs expanded {expanded:>11,} B "
          f"({expanded / latent:.0f}x smaller)")""",
    """md:## Walk the next token through the layers

Each stage is its own jitted function so it can be timed: embedding lookup, attention block
(RMSNorm + MLA in latent space + residual, writing this token's latents into the cache),
the router, the MoE (routed experts + shared expert) or dense MLP, and the final logits.""",
    """\
attn_j = jax.jit(forward.attention_block, static_argnums=(0, 4), static_argnames=("absorb", "kv_len"))
route_j = jax.jit(router.route, static_argnums=0)
moe_j = jax.jit(moe.moe, static_argnums=0)
mlp_j = jax.jit(moe.mlp)
final_j = jax.jit(forward.final_logits, static_argnums=0)
rope_j = jax.jit(forward.rope_cos_sin, static_argnums=0)

stage_ms = {}
tokens, positions = jnp.array([[token]]), jnp.array([[T]])
x = W.embed_tokens[tokens]
cos, sin = rope_j(cfg, positions)
walk_cache = cache
routing = {}
for i, lw in enumerate(W.layers):
    (x_attn, h, walk_cache), _, t_attn = timed(attn_j, cfg, lw, x, walk_cache, i, positions, cos, sin, absorb=True)
    stage_ms[f"L{i} attention"] = t_attn * 1e3
    if isinstance(lw.mlp, MoEWeights):
        (ids, gate_w), _, t_route = timed(route_j, cfg, lw.mlp.gate, h.reshape(-1, cfg.hidden_size))
        routing[i] = (np.asarray(ids)[0].tolist(), [round(float(g), 3) for g in np.asarray(gate_w)[0]])
        out, _, t_moe = timed(moe_j, cfg, lw.mlp, h)
        stage_ms[f"L{i} router"] = t_route * 1e3
        stage_ms[f"L{i} MoE (router + experts)"] = t_moe * 1e3
    else:
        out, _, t_mlp = timed(mlp_j, lw.mlp, h)
        stage_ms[f"L{i} dense MLP"] = t_mlp * 1e3
    x = x_attn + out
walk_logits, _, t_final = timed(final_j, cfg, W, x)
stage_ms["final norm + lm_head"] = t_final * 1e3

for i, (ids, gw) in routing.items():
    where = "CPU (cpu_ext)" if type(W.layers[i].mlp.experts).__name__ == "HostExperts" else jax.default_backend()
    print(f"layer {i}: router chose experts {ids} with gate weights {gw} -> ran on {where}")
for k, v in stage_ms.items():
    print(f"{k:28} {v:8.3f} ms")""",
    """md:The router picks `num_experts_per_tok` of `n_routed_experts` per token: first the best
`topk_group` of `n_group` expert groups, then the top-k inside them (biased scores for the
choice, unbiased sigmoid scores as gate weights, scaled by `routed_scaling_factor`).

Check the hand walk against the whole-model `forward.decode`:""",
    """\
decode_j = jax.jit(forward.decode, static_argnums=0)
(ref_logits, ref_cache), first, med = timed(decode_j, cfg, W, cache, tokens, positions)
print(f"forward.decode: {med * 1e3:.2f} ms per token (first call {first:.2f} s); "
      f"sum of the stages above: {sum(stage_ms.values()):.2f} ms")
np.testing.assert_allclose(np.asarray(walk_logits), np.asarray(ref_logits), rtol=2e-3, atol=2e-3)
np.testing.assert_allclose(np.asarray(walk_cache.c_kv), np.asarray(ref_cache.c_kv), rtol=1e-4, atol=1e-5)
print("hand walk == forward.decode; next token:", int(walk_logits[0, -1].argmax()))""",
    """md:## The engine: several requests at once

`jaxmoe.runtime.engine.Engine` serves requests over a fixed number of cache slots with
continuous batching and chunked prefill; `jaxmoe.generate` submits to `model.engine`.
Here the engine is driven by hand (`background=False`, then `run_until_idle`).""",
    """\
from jaxmoe.runtime.engine import Engine
from jaxmoe.runtime.sampling import SamplingParams

engine = Engine(cfg, W, "cpu-only", n_slots=4, max_len=MAX_LEN, chunk_size=16)
prompts = ["The quick brown fox", "Hello", "Mixture of experts", "One more request"]
requests = [
    engine.submit(model.tokenizer.encode(p), 8, SamplingParams(temperature=0.7 * (k % 2), seed=k), background=False)
    for k, p in enumerate(prompts)
]
t0 = time.perf_counter()
engine.run_until_idle()
elapsed = time.perf_counter() - t0
for p, r in zip(prompts, requests):
    print(f"{p!r:22} -> {r.output_ids} ({r.finish_reason}) {model.tokenizer.decode(r.output_ids)!r}")
n_out = sum(len(r.output_ids) for r in requests)
print(f"{len(requests)} requests, {n_out} tokens in {engine.steps_run} engine steps, {elapsed:.2f} s (incl. compiling)")
assert requests[0].output_ids[0] == token  # greedy, same prompt: the token walked above""",
    """\
model.close()""",
]

BENCHMARKS = [
    """md:# Benchmarks (quick mode)

Every benchmark is `python -m benchmarks.<name> [--quick] --json PATH` and writes
`{"metrics": ..., "env": ..., "details": ...}`. This notebook runs the quick modes (small sizes,
few repeats: numbers for the shape of the curves, not for the record; the committed full
runs are in `benchmarks/results/`) and shows them as tables and a plot.""",
    """\
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
        raise RuntimeError(f"benchmarks.{name} failed ({p.returncode}):\\n{p.stdout[-2000:]}\\n{p.stderr[-4000:]}")
    print(f"benchmarks.{name} --quick: {time.perf_counter() - t0:.1f} s")
    return json.loads(out.read_text())

# $JAXMOE_NB_BENCHES (comma-separated) limits which run live; the others show the committed
# full run from benchmarks/results/ when there is one (the test suite runs e2e's quick mode
# in its own test, so the notebook test skips it to stay fast).
LIVE = os.environ.get("JAXMOE_NB_BENCHES", ",".join(BENCHES)).split(",")
results, source = {}, {}
for name in BENCHES:
    committed = ROOT / "benchmarks" / "results" / f"{name}.json"
    if name in LIVE:
        results[name], source[name] = run_bench(name), "this run, --quick"
    elif committed.is_file():
        results[name], source[name] = json.loads(committed.read_text()), f"committed {committed.relative_to(ROOT)}"
for name, doc in results.items():
    env = doc["env"]
    print(f"{name:8} {source[name]:40}", {k: env.get(k) for k in ("cpu", "cores", "jax", "commit", "date")})""",
    """\
def show_table(rows, columns):
    \"\"\"A markdown table (rendered by Jupyter, readable as text otherwise).\"\"\"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\\n".join(lines)
    try:
        from IPython.display import Markdown, display
        display(Markdown(text))
    except ImportError:
        print(text)

for name, doc in results.items():
    print(f"## {name}")
    show_table([{"metric": k, "value": v} for k, v in doc["metrics"].items()], ["metric", "value"])""",
    """md:## FP8 expert GEMV: GB/s against the read-only bandwidth of the same run

Each GEMV timing is paired with a read-only pass over the same bytes (this machine's
bandwidth drifts with host load; only ratios from one run are stable).""",
    """\
gemv = results["kernels"]["details"]["gemv"]
rows = [{"threads": k.split("_")[0][1:], "M": k.split("_")[1][1:], "ms": round(v["ms"], 2),
         "GB/s": round(v["gbps"], 2), "read GB/s": round(v["read_gbps"], 2),
         "fraction of read": round(v["frac_of_read"], 3)} for k, v in gemv.items()]
show_table(rows, ["threads", "M", "ms", "GB/s", "read GB/s", "fraction of read"])""",
    """md:## Prefill strategies (tiny model)""",
    """\
pre = results["prefill"]["details"]
print(pre.get("note", ""))
prows = [{"strategy": r["strategy"], "tokens": r["tokens"], "tok/s": round(r["tok_s"], 1),
          "predicted tok/s": round(r["predicted_tok_s"], 1) if r.get("predicted_tok_s") else "",
          "measured/predicted": round(r["measured_over_predicted"], 3) if r.get("measured_over_predicted") else ""}
         for r in pre["results"].values()]
show_table(prows, ["strategy", "tokens", "tok/s", "predicted tok/s", "measured/predicted"])""",
    """md:## Plots (when matplotlib is installed)""",
    """\
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
    plt.show()""",
    """md:## End to end (when `benchmarks/e2e.py` exists)""",
    """\
if "e2e" in results:
    e2e = results["e2e"]
    show_table([{"metric": k, "value": v} for k, v in e2e["metrics"].items()], ["metric", "value"])
else:
    print("no e2e results: benchmarks/e2e.py is not in this checkout, or it did not run and none is committed")""",
    """md:## SLO report (`benchmarks/slo.py`)

Time to first token against prompt length, decode tok/s against context and batch, and a long
prompt arriving while requests decode, beside the performance model's predictions for this
machine. The plots come from this run's `--quick` (tiny model) when it ran live, else from the
committed full run (`benchmarks/results/slo.md`).""",
    """\
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
    print("no SLO results: benchmarks/slo.py is not in this checkout, or it did not run and none is committed")""",
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_architecture.ipynb": ARCHITECTURE,
    "03_benchmarks.ipynb": BENCHMARKS,
}


def build(cells: list[str]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, src in enumerate(cells):
        cell = new_markdown_cell(src[3:]) if src.startswith("md:") else new_code_cell(src)
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
