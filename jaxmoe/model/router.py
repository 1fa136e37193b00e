"""DeepSeek-V3's MoE router ("noaux_tc").

sigmoid scores; `e_score_correction_bias` added for the *choice* only; group-limited
selection (each group scored by the sum of its two best biased scores, the best
`topk_group` groups kept); top-k over the kept experts; the gate weights are the unbiased
sigmoid scores of the chosen experts, normalised to sum 1 when `norm_topk_prob`, then
multiplied by `routed_scaling_factor`. Computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.weights import RouterWeights


def route(cfg: ModelConfig, gate: RouterWeights, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (topk_ids [N, k] int32, topk_weights [N, k] float32)."""
    logits = jnp.einsum(
        "nh,eh->ne", x.astype(jnp.float32), gate.weight.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    scores = jax.nn.sigmoid(logits)
    choice = scores + gate.e_score_correction_bias.astype(jnp.float32)
    if cfg.n_group > 1:
        n = choice.shape[0]
        grouped = choice.reshape(n, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, n_group]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        expert_mask = jnp.repeat(group_mask, cfg.n_routed_experts // cfg.n_group, axis=-1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor
