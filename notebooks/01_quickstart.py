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
# # jaxmoe quickstart
#
# jaxmoe runs DeepSeek-V3-family Mixture-of-Experts models on JAX/XLA. This notebook uses a
# *synthetic* checkpoint (random weights in the real DeepSeek-V3 layout, FP8 linears, a small
# tokenizer) of the `tiny` config, so it runs anywhere in seconds. The generated text is
# random-looking: the weights are random. Swap `path` for a real checkpoint directory and the
# same calls apply.

# %% [markdown]
# ## 1. Write a synthetic checkpoint

# %%
import os
import tempfile
import time
from pathlib import Path

import jaxmoe
from jaxmoe.loading.synthetic import write_synthetic_checkpoint

# Checkpoints go to $JAXMOE_CACHE_DIR (the test suite points it to a temp dir), else a temp dir.
root = Path(os.environ.get("JAXMOE_CACHE_DIR") or tempfile.mkdtemp(prefix="jaxmoe-nb-"))
cfg = jaxmoe.ModelConfig.named("tiny")
t0 = time.perf_counter()
path = write_synthetic_checkpoint(root / "tiny-fp8", cfg, fmt="fp8", overwrite=True)
print(f"wrote {path} in {time.perf_counter() - t0:.2f} s:", sorted(p.name for p in path.iterdir()))

# %% [markdown]
# ## 2. Load it
#
# `jaxmoe.load` reads `config.json` + safetensors (FP8 weights stay FP8), the tokenizer, and
# picks a runtime preset (`cpu-only` here without a GPU). `max_seq_len` caps the context
# (prompt + generated tokens) and so the KV-cache memory.

# %%
t0 = time.perf_counter()
model = jaxmoe.load(path, max_seq_len=128)
print(f"loaded in {time.perf_counter() - t0:.2f} s")
print(model)
print("layers:", model.cfg.num_hidden_layers, "| routed experts:", model.cfg.n_routed_experts,
      "| experts per token:", model.cfg.num_experts_per_tok, "| vocab:", model.cfg.vocab_size)
print("runtime preset:", model.runtime.preset, "| cache slots:", model.runtime.n_slots)
print("CPU kernels (cpu_ext) in use:", model.cpu_kernels, "| context:", model.context_len)

# %% [markdown]
# ## 3. Generate
#
# `generate` returns the text, the generated token ids, why it stopped and timings. The first
# call compiles the step programs; `model.compile(n)` can warm them ahead of time.

# %%
print(f"compiled in {model.compile(prompt_tokens=8):.2f} s")
result = jaxmoe.generate(model, "Hello, world", max_new_tokens=16)
print("text:         ", repr(result.text))
print("prompt ids:   ", result.prompt_token_ids)
print("token ids:    ", result.token_ids)
print("finish_reason:", result.finish_reason)
t = result.timings
print(f"TTFT {t.ttft_s * 1e3:.1f} ms | prefill {t.prefill_tok_s:.0f} tok/s | decode {t.decode_tok_s:.1f} tok/s "
      f"| {t.prompt_tokens} prompt + {t.generated_tokens} generated tokens")

# %% [markdown]
# A prompt can also be token ids (no tokenizer needed):

# %%
ids_result = jaxmoe.generate(model, [1, 17, 42, 99], max_new_tokens=8, ignore_eos=True)
print(ids_result.token_ids, ids_result.finish_reason)
assert len(ids_result.token_ids) == 8 and ids_result.finish_reason == "length"

# %% [markdown]
# ## 4. Stream
#
# `stream_generate` yields one `StreamResponse` per token: its id, the text it completes (can be
# empty while a multi-byte character is incomplete), the running timings; the last one has
# `finish_reason` set. `generate` is exactly the join of the stream.

# %%
pieces = []
for r in jaxmoe.stream_generate(model, "Hello, world", max_new_tokens=16):
    pieces.append(r.text)
    print(f"{r.token_id:4d} {r.text!r:12} {r.finish_reason or ''}")
assert "".join(pieces) == result.text  # greedy: the same tokens as generate above

# %% [markdown]
# ## 5. Sampling options
#
# `temperature=0` (the default) is greedy. With a temperature, `top_k` / `top_p` filter the
# distribution and `seed` makes the draw reproducible (per request: what else runs in the same
# batch does not change it). `stop` ends generation at a stop string (not part of the text).

# %%
opts = dict(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, ignore_eos=True)
a = jaxmoe.generate(model, "Once upon a time", seed=1, **opts)
b = jaxmoe.generate(model, "Once upon a time", seed=1, **opts)
c = jaxmoe.generate(model, "Once upon a time", seed=2, **opts)
print("seed 1:", a.token_ids)
print("seed 1:", b.token_ids)
print("seed 2:", c.token_ids)
assert a.token_ids == b.token_ids

# %%
# A stop string: take a piece of the greedy text above, so that it certainly occurs.
full = jaxmoe.generate(model, "Hello, world", max_new_tokens=16, ignore_eos=True)
half = full.text[len(full.text) // 2:]
pairs = (half[i:i + 2] for i in range(len(half) - 1))
stop = next((p for p in pairs if p.isascii() and p.isprintable()), half[:2]) or "\n"
stopped = jaxmoe.generate(model, "Hello, world", max_new_tokens=16, ignore_eos=True, stop=[stop])
print(f"full:    {full.text!r}")
print(f"stop={stop!r}: {stopped.text!r} ({stopped.finish_reason})")

# %% [markdown]
# ## 6. Chat messages
#
# `messages` applies the checkpoint's chat template (instead of `prompt`).

# %%
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a mixture of experts?"},
]
chat_ids = model.tokenizer.encode_chat(messages)
print(f"{len(chat_ids)} prompt tokens: {model.tokenizer.decode(chat_ids)[:200]!r}")
reply = jaxmoe.generate(model, messages=messages, max_new_tokens=12)
print(repr(reply.text), reply.finish_reason)

# %%
model.close()  # frees the native memory of the CPU-kernel weights now
