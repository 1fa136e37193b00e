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
# # One token through the model
#
# jaxmoe's model is a set of pure functions of (weights, cache, tokens, positions) in
# `jaxmoe.model`: `forward` (embeddings, decoder layers, final logits), `mla` (multi-head
# latent attention), `router` (DeepSeek-V3's group-limited sigmoid top-k), `moe` (routed + shared
# experts) and `cache` (the compressed latent KV cache). This notebook prefills a prompt, then
# walks the next token through each stage by hand, checks the result against
# `forward.forward_absorbed`, and ends with the serving engine batching several requests.

# %%
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
print(f"wrote {path} in {time.perf_counter() - t0:.2f} s:", sorted(p.name for p in path.iterdir()))

# %%
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
    print(f"layer {i}: MLA + {kind}{where}")


# %% [markdown]
# The routed experts' type says where they run: `HostExperts` lives in host memory and
# runs through jaxmoe's native CPU kernels (cpu_ext, an XLA FFI call), `ExpertsWeights` is
# a plain JAX pytree on the default device.
#
# ## Prefill the prompt

# %%
def timed(fn, *args, repeats=5, **kw):
    """(result, first call s (compiles), median s of the next calls)."""
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
prefill_j = jax.jit(forward.forward_expanded, static_argnums=0)
cache0 = kvcache.init_cache(cfg, 1, MAX_LEN, model.dtype)
(logits, cache), first, med = timed(prefill_j, cfg, W, cache0, jnp.array([prompt]), jnp.arange(T)[None])
token = int(logits[0, -1].argmax())
print(f"prompt {prompt} ({T} tokens): prefill {med * 1e3:.2f} ms (first call, compiling: {first:.2f} s)")
print("next token:", token, repr(model.tokenizer.decode([token])))

# %% [markdown]
# ## The latent KV cache
#
# MLA caches, per layer and position, only `c_kv` (the compressed latent, `kv_lora_rank` wide)
# and `k_pe` (the shared rotary key, `qk_rope_head_dim` wide); the per-head keys and values
# are re-derived from them. An expanded cache would hold every head's key and value.

# %%
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
          f"({expanded / latent:.0f}x smaller)")

# %% [markdown]
# ## Walk the next token through the layers
#
# Each stage is its own jitted function so it can be timed: embedding lookup, attention block
# (RMSNorm + MLA in latent space + residual, writing this token's latents into the cache),
# the router, the MoE (routed experts + shared expert) or dense MLP, and the final logits.

# %%
attn_j = jax.jit(forward.attention_block, static_argnums=(0, 4), static_argnames=("form", "kv_len"))
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
    (x_attn, h, walk_cache), _, t_attn = timed(attn_j, cfg, lw, x, walk_cache, i, positions, cos, sin, form="absorbed")
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
    print(f"{k:28} {v:8.3f} ms")

# %% [markdown]
# The router picks `num_experts_per_tok` of `n_routed_experts` per token: first the best
# `topk_group` of `n_group` expert groups, then the top-k inside them (biased scores for the
# choice, unbiased sigmoid scores as gate weights, scaled by `routed_scaling_factor`).
#
# Check the hand walk against the whole-model `forward.forward_absorbed`:

# %%
decode_j = jax.jit(forward.forward_absorbed, static_argnums=0)
(ref_logits, ref_cache), first, med = timed(decode_j, cfg, W, cache, tokens, positions)
print(f"forward.forward_absorbed: {med * 1e3:.2f} ms per token (first call {first:.2f} s); "
      f"sum of the stages above: {sum(stage_ms.values()):.2f} ms")
np.testing.assert_allclose(np.asarray(walk_logits), np.asarray(ref_logits), rtol=2e-3, atol=2e-3)
np.testing.assert_allclose(np.asarray(walk_cache.c_kv), np.asarray(ref_cache.c_kv), rtol=1e-4, atol=1e-5)
print("hand walk == forward.forward_absorbed; next token:", int(walk_logits[0, -1].argmax()))

# %% [markdown]
# ## The engine: several requests at once
#
# `jaxmoe.serving.engine.Engine` serves requests over a fixed number of cache slots with
# continuous batching and chunked prefill; `jaxmoe.generate` submits to `model.engine`.
# Here the engine is driven by hand (`background=False`, then `run_until_idle`).

# %%
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.sampling import SamplingParams

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
assert requests[0].output_ids[0] == token  # greedy, same prompt: the token walked above

# %%
model.close()
