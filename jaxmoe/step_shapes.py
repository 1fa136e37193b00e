"""The static shapes of one engine step, and the attention form each shape takes.

Pure arithmetic on the model config, without JAX: the serving executors use these rules to
choose what they compile, the model's attention uses the key block, and the planner's kernel
model uses the same rules to predict what the executors will run. One copy, so the prediction
and the execution cannot drift apart.

- rows: the busy slots padded to a power of two (`row_bucket`);
- columns: 1 for decode, else a power of two >= MIN_WIDTH_BUCKET (`width_bucket`), or narrower
  where a TPOT target plans narrow chunks (`narrow_width`);
- prompt chunks: full chunks, then the prompt's last tokens cut where padding costs more than
  another step (`next_chunk`);
- keys: a power-of-two window over the cache (`kv_window`);
- attention form: absorbed (latent space) or expanded (keys and values expanded through
  kv_b_proj), whichever costs less (`expanded_is_cheaper`, `attention_form`).
"""

from __future__ import annotations

import functools
from typing import Literal

from jaxmoe.config import ModelConfig

AttentionForm = Literal["absorbed", "expanded"]

ATTENTION_KEY_BLOCK = 512  # key slots per block of the blocked (online-softmax) attention, accelerators
# ... and on the CPU, where a block's scores ((queries x heads) x 128 floats) stay in cache: one
# layer of bench-v3-mid's absorbed attention, 128 queries over 1,327 keys, takes 0.40 s in blocks
# of 128 against 0.49 s in blocks of 512 (2 AVX2 cores; docs/PERFORMANCE_MODEL.md)
CPU_ATTENTION_KEY_BLOCK = 128
# The absorbed form's multiply-adds run this much faster than the expanded form's on the CPU (plain
# dots in key blocks against kv_b_proj's expansion and per-head dots): bench-v3-mid's 1,350-token
# prompt in 256-token chunks, where expanded takes 1.46x fewer of them, prefills in 56 s absorbed
# against 61 s expanded (2 AVX2 cores), so the speed-up is above 1.46.
CPU_ABSORBED_SPEEDUP = 1.5
MIN_KV_WINDOW = 64
MIN_WIDTH_BUCKET = 16
# A CPU step's fixed cost in columns (weights read once per step, per-layer dispatch): bench-v3-mid
# on 2 AVX2 cores costs ~0.25 s + 0.053 s per column over a 1,200-token prefix, ~5 columns; the
# bound is set at a whole smallest bucket, so a cut must save at least that much padding.
STEP_OVERHEAD_COLUMNS = MIN_WIDTH_BUCKET


def attention_key_block(backend: str) -> int:
    """Key slots per block of the blocked attention on a JAX backend ("cpu", "gpu", ...)."""
    return CPU_ATTENTION_KEY_BLOCK if backend == "cpu" else ATTENTION_KEY_BLOCK


def kv_window(end: int, max_len: int) -> int:
    """Cache slots a step attends over: the next power of two >= end (>= MIN_KV_WINDOW, <= max_len),
    so attention costs what the longest sequence needs and compiles once per power of two."""
    return min(max_len, 1 << (max(end, MIN_KV_WINDOW) - 1).bit_length())


def row_bucket(n_active: int, n_slots: int) -> int:
    """Rows a step runs for `n_active` busy slots: the next power of two (<= n_slots), so a
    lone request costs one row, not n_slots, and each bucket compiles once."""
    return min(n_slots, 1 << max(n_active - 1, 0).bit_length())


def width_bucket(n_tokens: int, width: int) -> int:
    """Columns a step runs for rows of at most `n_tokens` real tokens: 1, or a power of two
    >= MIN_WIDTH_BUCKET (<= the planned width), so a short prompt does not pay for a full chunk
    of padding in the dense kernels and each bucket compiles once."""
    if n_tokens <= 1:
        return 1
    return min(width, max(MIN_WIDTH_BUCKET, 1 << (n_tokens - 1).bit_length()))


def narrow_width(n_tokens: int) -> int:
    """Columns of a step whose prompt chunks are narrower than MIN_WIDTH_BUCKET, which only a TPOT
    target plans (`serving.scheduler`): the next power of two >= n_tokens (1, 2, 4, 8). The
    executor runs the planned width as it is, and the step model predicts it."""
    return 1 << max(n_tokens - 1, 0).bit_length()


def groups_in_one_program(chunk_width: int) -> bool:
    """Whether the fused executor runs a step's prompt chunks of `chunk_width` columns in one
    program with its decode rows (`model.groups.run_groups`, for families with a `grouped_forward`):
    the narrow chunks a TPOT target plans, whose own program would cost more in reading every
    weight again than in computing them. Wider chunks run in a program of their own, so a step
    compiles one program per (decode window, chunk width, chunk window) combination only where
    the target needs it."""
    return chunk_width < MIN_WIDTH_BUCKET


def remainder_chunks(n_tokens: int, width: int, overhead: int = STEP_OVERHEAD_COLUMNS) -> tuple[int, ...]:
    """The chunks that prefill a prompt's last `n_tokens` (<= width) at the least cost when every
    column a step runs costs one (padding too: the dense Linears and attention compute it) and each
    step `overhead` more: full buckets (powers of two >= MIN_WIDTH_BUCKET, below n_tokens), largest
    first, then the rest in its own bucket. 151 of a 256-wide step: (128, 23), 160 columns in two
    steps instead of 256 in one; 250: (250,); ties go to fewer steps."""
    if n_tokens > width:
        raise ValueError(f"remainder_chunks: {n_tokens} tokens do not fit a step of {width} columns")
    return _cheapest_cut(n_tokens, width, overhead)[1]


@functools.lru_cache(maxsize=4096)
def _cheapest_cut(n_tokens: int, width: int, overhead: int) -> tuple[int, tuple[int, ...]]:
    """(cost, chunks) of `remainder_chunks`."""
    best = (overhead + width_bucket(n_tokens, width), (n_tokens,))
    if n_tokens <= MIN_WIDTH_BUCKET:
        return best
    b = 1 << (n_tokens - 1).bit_length() - 1  # the largest power of two below n_tokens
    while b >= MIN_WIDTH_BUCKET:
        if b <= width:
            cost, rest = _cheapest_cut(n_tokens - b, width, overhead)
            if overhead + b + cost < best[0]:
                best = (overhead + b + cost, (b, *rest))
        b //= 2
    return best


def next_chunk(n_left: int, width: int, overhead: int | None = STEP_OVERHEAD_COLUMNS) -> int:
    """Tokens of a prompt's next chunk in steps of at most `width` columns with `n_left` tokens to
    go: `width` while more are left, then the first of `remainder_chunks` (overhead None: the
    whole remainder in one step, for executors whose padding costs next to nothing)."""
    if n_left > width or overhead is None:
        return min(n_left, width)
    return remainder_chunks(n_left, width, overhead)[0]


def expanded_is_cheaper(cfg: ModelConfig, n_queries: int, n_keys: int, on_cpu: bool = False) -> bool:
    """Whether expanded attention (keys/values expanded once per step) costs less than absorbed
    attention (queries and outputs absorbed) for n_queries per row over n_keys cache slots, in
    multiply-adds per row and head:
        expanded: (nope + rope + v) * S * T  +  (nope + v) * r * S   (expanding S keys)
        absorbed: (2 r + rope)      * S * T  +  (nope + v) * r * T   (absorbing T queries)
    DeepSeek-V3 (r 512, nope = v 128, rope 64): expanded wins from ~100 queries over 256 keys
    and ~170 over long contexts, i.e. for prompt chunks, never for decode. on_cpu: the absorbed
    form's multiply-adds count 1 / CPU_ABSORBED_SPEEDUP (XLA's CPU runs its plain dots faster than
    the expanded form's): expanded from ~270 queries over 1,024 keys and ~325 over long contexts."""
    r, rope, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    s, t = n_keys, n_queries
    expanded = (nope + rope + v) * s * t + (nope + v) * r * s
    absorbed = (2 * r + rope) * s * t + (nope + v) * r * t
    return expanded * (CPU_ABSORBED_SPEEDUP if on_cpu else 1) < absorbed


def attention_form(cfg: ModelConfig, width: int, kv_len: int, on_cpu: bool = False) -> AttentionForm:
    """The form a step of `width` columns over `kv_len` keys attends in: absorbed for decode
    and narrow chunks, expanded where that costs less (`expanded_is_cheaper`; on_cpu: attention
    runs on the CPU). Both give the same logits."""
    return "expanded" if expanded_is_cheaper(cfg, width, kv_len, on_cpu) else "absorbed"
