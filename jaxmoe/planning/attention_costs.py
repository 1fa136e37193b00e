"""What one attention layer costs, by attention kind: the part of a family's cost model that
differs between MLA (DeepSeek-V3, Kimi-K2) and grouped-query attention (Qwen3-MoE, GLM-4.5).

Pure arithmetic on a config (no hardware). A family's config class names its attention
(`ATTENTION_KIND`: "mla" or "gqa"); `of(cfg)` prices it, and planning/cost_model.py builds the
rest of the model's costs around it. FLOPs count a multiply-add as 2; "per score" is one
(query, head, key) triple.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class AttentionCosts:
    """One attention layer of a model, per token and per score."""

    kind: str  # "mla" | "gqa"
    heads: int  # query heads
    linears: tuple[tuple[int, int], ...]  # [n, k] of the projections every token goes through
    cache_matrices: tuple[tuple[int, int], ...]  # [n, k] stored beside them, applied to the cache (MLA's kv_b_proj)
    kv_width: int  # cache numbers per position per layer (all of the layer's cache arrays)
    score_flops: int  # per score: query . key plus probability x value, the plain (expanded) form
    absorbed_score_flops: int  # the same in the latent form (MLA absorbed); GQA: = score_flops
    expand_flops_per_key: int  # the latent form's expansion of one cached position to keys and values (MLA)
    act_width: int  # numbers per token of queries plus attention output (heads x (qk + v))
    absorbed_groups: tuple[int, int] | None = None  # MLA: weights of kv_b_proj's halves (W_UK, W_UV)

    @property
    def absorbs(self) -> bool:
        """Whether the cache holds a latent that the step can attend in absorbed or expanded form."""
        return self.absorbed_groups is not None


def mla(cfg: Any) -> AttentionCosts:
    """DeepSeek-V3's multi-head latent attention: the cache holds the latent (kv_lora_rank) and
    the rope key; kv_b_proj expands it (prefill) or is absorbed into queries and outputs (decode)."""
    h, heads, lora, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    qk = nope + rope
    q = [(cfg.q_lora_rank, h), (heads * qk, cfg.q_lora_rank)] if cfg.q_lora_rank else [(heads * qk, h)]
    return AttentionCosts(
        kind="mla", heads=heads,
        linears=tuple(q + [(lora + rope, h), (h, heads * v)]),
        cache_matrices=((heads * (nope + v), lora),),
        kv_width=lora + rope,
        score_flops=2 * (qk + v),
        absorbed_score_flops=2 * (2 * lora + rope),
        expand_flops_per_key=2 * lora * heads * (nope + v),
        act_width=heads * (qk + v),
        absorbed_groups=(heads * nope * lora, heads * v * lora),
    )


def gqa(cfg: Any) -> AttentionCosts:
    """Grouped-query attention (`cfg.attention`: layers.gqa.GQAConfig): keys and values of
    kv_heads heads cached per position, each query head reading its group's."""
    a, h = cfg.attention, cfg.hidden_size
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    return AttentionCosts(
        kind="gqa", heads=a.num_attention_heads,
        linears=((q, h), (kv, h), (kv, h), (h, q)),
        cache_matrices=(),
        kv_width=2 * kv,
        score_flops=2 * 2 * a.head_dim,
        absorbed_score_flops=2 * 2 * a.head_dim,
        expand_flops_per_key=0,
        act_width=2 * q,
    )


KINDS = {"mla": mla, "gqa": gqa}


def of(cfg: Any) -> AttentionCosts:
    """The attention costs of a config of any family, by its class's `ATTENTION_KIND`."""
    kind = getattr(cfg, "ATTENTION_KIND", None)
    if kind not in KINDS:
        raise ValueError(f"{type(cfg).__name__} names no attention the planner prices (ATTENTION_KIND {kind!r}; "
                         f"known: {sorted(KINDS)})")
    return KINDS[kind](cfg)
