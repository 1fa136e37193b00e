"""One step over row groups that differ in width and key window, any model family.

The fused executor's narrow mixed step (serving/executors.FusedStep) runs decode rows [B_d, 1]
beside a prompt chunk [B_c, T] in one program: each group attends on its own -- its block
table, positions and static key window -- and everything per token (MLPs, shared and routed
experts, lm_head) runs once over every group's tokens, so each weight is read once.

`run_groups` is the skeleton and `forward_groups` DeepSeek-V3's (MLA); the GQA families' is
`layers.gqa_decoder.forward_groups`. A family brings its layer in three parts (`GroupLayer`):
- `write(lw, x, cache, layer, positions, rope) -> (cache, state)`: the input norm and the new
  tokens' cache entries (state: what its attention needs again, e.g. the normed x or queries);
- `attend(lw, x, state, cache, layer, positions, rope, group) -> x`: x + the group's attention;
- `mlp(lw, x, real) -> x`: the per-token rest of the layer over [1, N, H];
and `rope(positions) -> (cos, sin)`. Every group's entries are written before any group reads
the cache: a write after another group's read of the same buffer makes XLA copy the whole
cache pool (3x slower than two programs on the demo model, docs/PERFORMANCE_MODEL.md).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, write_layer
from jaxmoe.model.forward import final_logits, mlp_block
from jaxmoe.model.mla import attend_absorbed, attend_expanded, mla_latents
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.rope import rope_cos_sin
from jaxmoe.model.weights import Weights


@dataclasses.dataclass(frozen=True)
class GroupLayer:
    rope: Callable
    write: Callable
    attend: Callable
    mlp: Callable


def run_groups(cfg, weights, cache: KVCache, groups, fam: GroupLayer) -> tuple[jax.Array, KVCache]:
    """groups: ((tokens [B_g, T_g], positions [B_g, T_g], block table [B_g, n] or None,
    logit_index [B_g]), ...). -> (logits [sum B_g, 1, V] at each row's logit_index, in group
    order; the cache, its block table as given). Each row's logits equal the family's forward
    over its group alone, up to the order of float sums."""
    table = cache.block_table
    tables = [t for _, _, t, _ in groups]
    positions = [jnp.asarray(p, jnp.int32) for _, p, _, _ in groups]
    xs = [weights.embed_tokens[jnp.asarray(t, jnp.int32)] for t, _, _, _ in groups]
    ropes = [fam.rope(p) for p in positions]
    real = jnp.concatenate([(p < cache.max_len).reshape(-1) for p in positions])[None]
    hidden, splits = xs[0].shape[-1], list(itertools.accumulate(p.size for p in positions))[:-1]
    for i, lw in enumerate(weights.layers):
        states = []
        for g in range(len(groups)):
            cache, state = fam.write(lw, xs[g], cache.replace(block_table=tables[g]), i, positions[g], ropes[g])
            states.append(state)
        for g in range(len(groups)):
            xs[g] = fam.attend(lw, xs[g], states[g], cache.replace(block_table=tables[g]), i, positions[g], ropes[g], g)
        flat = fam.mlp(lw, jnp.concatenate([x.reshape(-1, hidden) for x in xs])[None], real)
        xs = [part.reshape(x.shape) for part, x in zip(jnp.split(flat[0], splits), xs)]
    last = [x[jnp.arange(x.shape[0]), jnp.asarray(idx, jnp.int32)] for x, (_, _, _, idx) in zip(xs, groups)]
    return final_logits(cfg, weights, jnp.concatenate(last)[:, None]), cache.replace(block_table=table)


def forward_groups(cfg: ModelConfig, weights: Weights, cache: KVCache, groups, *, kv_lens, forms) -> tuple[jax.Array, KVCache]:
    """One step over row groups of different widths and key windows (`run_groups`:
    the fused executor's decode rows beside a narrow prompt chunk): group g attends over
    `kv_lens[g]` keys in form `forms[g]` (static); the MLPs, experts and lm_head run once over
    every group's tokens. -> (logits [sum B_g, 1, V] at each row's logit_index; cache)."""

    def write(lw, x, cache, layer, positions, rope):
        normed = rms_norm(x, lw.input_layernorm, cfg.rms_norm_eps)
        return write_layer(cache, layer, positions, *mla_latents(cfg, lw.self_attn, normed, *rope)), normed

    def attend(lw, x, normed, cache, layer, positions, rope, g):
        form = {"absorbed": attend_absorbed, "expanded": attend_expanded}[forms[g]]
        return x + form(cfg, lw.self_attn, normed, cache, layer, positions, *rope, kv_lens[g])

    def mlp_of(lw, x, real):
        return mlp_block(cfg, lw, x, rms_norm(x, lw.post_attention_layernorm, cfg.rms_norm_eps), real)

    return run_groups(cfg, weights, cache, groups, GroupLayer(lambda p: rope_cos_sin(cfg, p), write, attend, mlp_of))
