"""The key-blocked (online-softmax) MLA attention of model/mla.py: equal to the one-piece
softmax on random inputs, and to transformers layer by layer with small blocks.

Blocks are made small (7, 10, 16 key slots) so that several full blocks, a partial last
block (cache lengths not a multiple of the block), rows whose visible keys end inside a
block and rows that see nothing in a whole block (causal masking at an offset start) all
occur at the oracle's sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import step_shapes
from jaxmoe.model import mla
from jaxmoe.model.cache import KVCache
from jaxmoe.model.rope import rope_cos_sin

from . import hf_models as H
from .conftest import MAX_LEN, PROMPT_LEN, new_cache
from .test_oracle import TOL, assert_close

ONE_PIECE = 1 << 30  # a block larger than any cache: the unblocked softmax


def _random_case(cfg, seed: int):
    """A cache of random latents (every slot filled), x [2, 13, H] and positions: row 0 a chunk
    at offset 50, row 1 at offset 3 with its last 4 tokens padding (position MAX_LEN)."""
    rng = np.random.default_rng(seed)
    L = cfg.num_hidden_layers
    cache = KVCache(
        c_kv=jnp.asarray(rng.standard_normal((L, 2, MAX_LEN, cfg.kv_lora_rank)), jnp.float32),
        k_pe=jnp.asarray(rng.standard_normal((L, 2, MAX_LEN, cfg.qk_rope_head_dim)), jnp.float32),
    )
    t = 13
    x = jnp.asarray(rng.standard_normal((2, t, cfg.hidden_size)), jnp.float32)
    pos = np.stack([np.arange(50, 50 + t), np.arange(3, 3 + t)]).astype(np.int32)
    pos[1, -4:] = MAX_LEN
    return x, cache, jnp.asarray(pos)


@pytest.mark.parametrize("form,kv_len,block", [("expanded", None, 7), ("absorbed", None, 7), ("expanded", 64, 10),
                                                 ("absorbed", 64, 1)])
def test_blocked_equals_one_piece(qlora, form, kv_len, block):
    attend = {"expanded": mla.mla_expanded, "absorbed": mla.mla_absorbed}[form]
    cfg, w = qlora.cfg, qlora.weights
    x, cache, pos = _random_case(cfg, seed=block)
    cos, sin = rope_cos_sin(cfg, pos)
    run = jax.jit(lambda lw, c, b: attend(cfg, lw, x, c, 1, pos, cos, sin, kv_len, b), static_argnums=2)
    want, want_cache = run(w.layers[1].self_attn, cache, ONE_PIECE)
    got, got_cache = run(w.layers[1].self_attn, cache, block)
    real = np.asarray(pos) < (kv_len or MAX_LEN)  # padding rows: no contract on their output
    assert_close(np.asarray(got)[real], np.asarray(want)[real], 2e-5, f"{attend.__name__} block={block} kv_len={kv_len}")
    assert_close(got_cache.c_kv, want_cache.c_kv, 0.0, "latents written")
    assert np.isfinite(np.asarray(got)).all()


def test_one_query_per_row_attends_in_one_piece():
    assert mla.key_block_for(1, 10_000, 16) is None
    assert mla.key_block_for(8, 16, 16) is None and mla.key_block_for(8, 17, 16) == 16
    with pytest.raises(ValueError, match="key block"):
        mla.key_block_for(8, 17, 0)


def test_blocked_attention_matches_hf(qlora):
    """Every layer's MLA (expanded, as stream-loaded prefill runs it) with 16-key blocks on
    transformers' own inputs for a 40-token prompt: the cache's 96 slots are 6 blocks, the
    visible 40 end inside the third, and later blocks are fully masked for every query."""
    cfg, w = qlora.cfg, qlora.weights
    acts = H.capture(qlora.hf, qlora.prompt)
    pos = jnp.broadcast_to(jnp.arange(PROMPT_LEN, dtype=jnp.int32), (1, PROMPT_LEN))
    cos, sin = rope_cos_sin(cfg, pos)
    attn = jax.jit(lambda lw, x, layer: mla.mla_expanded(cfg, lw, x, new_cache(cfg, 1), layer, pos, cos, sin, None, 16)[0])
    for i, lw in enumerate(w.layers):
        out = attn(lw.self_attn, jnp.asarray(acts[f"attn_in.{i}"]), i)
        assert_close(out, acts[f"attn_out.{i}"], TOL, f"layer {i}: MLA with 16-key blocks vs transformers")


def test_the_cheaper_attention_form_by_hand():
    """DeepSeek-V3 dims (r 512, nope = v 128, rope 64), per row and head:
    expanded 320 S T + 131072 S, absorbed 1088 S T + 131072 T. Over S = 256 keys the forms
    cost the same at T = 33554432 / 327680 = 102.4 queries; over long contexts expanded wins
    from T > 131072 / 768 = 170.7. Decode (T = 1) stays absorbed over 2 keys or more. On the CPU
    the expanded form costs 1.5x per multiply-add: over long contexts it wins from
    T > 1.5 x 131072 / (1088 - 1.5 x 320) = 323.4."""
    from jaxmoe.config import ModelConfig

    v3 = ModelConfig.named("deepseek-v3")
    assert (v3.kv_lora_rank, v3.qk_nope_head_dim, v3.v_head_dim, v3.qk_rope_head_dim) == (512, 128, 128, 64)
    assert not step_shapes.expanded_is_cheaper(v3, 102, 256) and step_shapes.expanded_is_cheaper(v3, 103, 256)
    assert not step_shapes.expanded_is_cheaper(v3, 170, 1 << 20) and step_shapes.expanded_is_cheaper(v3, 171, 1 << 20)
    assert not any(step_shapes.expanded_is_cheaper(v3, 1, s) for s in (2, 64, 4096, 1 << 17))
    assert step_shapes.expanded_is_cheaper(v3, 256, 512) and not step_shapes.expanded_is_cheaper(v3, 64, 512)
    assert step_shapes.CPU_ABSORBED_SPEEDUP == 1.5
    long = 1 << 20
    assert not step_shapes.expanded_is_cheaper(v3, 323, long, on_cpu=True)
    assert step_shapes.expanded_is_cheaper(v3, 324, long, on_cpu=True)
