"""What a routed-expert model costs: bytes and FLOPs per token, per layer, per chunk.

Pure arithmetic on a family's config (no hardware here; planning/planner.py turns these into
seconds). The attention's share comes from the config's attention kind
(planning/attention_costs.py: MLA or GQA); the rest (dense MLPs, routers, shared and routed
experts, embeddings, lm_head) is common to every family. Bytes are as stored: FP8 Linears 1
byte/weight + fp32 block scales, everything else bf16. FLOPs count a multiply-add as 2.
Attention FLOPs assume causal skipping (a query at position p sees p + 1 keys), as a fused
prefill kernel does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxmoe.planning import attention_costs
from jaxmoe.planning.attention_costs import AttentionCosts

BF16 = 2


def linear_bytes(cfg: Any, n: int, k: int) -> int:
    """A stored [n, k] Linear: FP8 values + fp32 scales per block, or bf16."""
    if cfg.quantization is None:
        return n * k * BF16
    bn, bk = cfg.quantization.weight_block_size
    return n * k + 4 * math.ceil(n / bn) * math.ceil(k / bk)


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Per-token FLOPs and stored bytes, by layer kind (a "dense" layer has an MLP, an "MoE"
    layer a router, shared experts and routed experts)."""

    cfg: Any
    attn: AttentionCosts
    n_layers: int
    moe_layers: int
    attn_bytes: int  # attention projections of one layer (MLA: kv_b_proj included)
    dense_mlp_bytes: int
    moe_resident_bytes: int  # router + shared experts of one MoE layer
    expert_bytes: int  # one routed expert (gate + up + down)
    embed_bytes: int
    lm_head_bytes: int
    attn_linear_flops: float  # per token per layer (kv_b_proj: see attention_flops)
    dense_mlp_flops: float  # per token per dense layer
    moe_resident_flops: float  # per token per MoE layer: router + shared experts
    routed_flops_per_layer: float  # per token per MoE layer: the k routed experts

    @property
    def dense_layers(self) -> int:
        return self.n_layers - self.moe_layers

    @property
    def layer_experts_bytes(self) -> int:
        return self.cfg.n_routed_experts * self.expert_bytes

    def layer_resident_bytes(self, moe: bool) -> int:
        return self.attn_bytes + (self.moe_resident_bytes if moe else self.dense_mlp_bytes)

    def layer_resident_flops(self, moe: bool) -> float:
        return self.attn_linear_flops + (self.moe_resident_flops if moe else self.dense_mlp_flops)

    @property
    def resident_bytes(self) -> int:
        """Everything but the routed experts: embeddings, attention, dense MLPs, routers, shared experts, lm_head."""
        return (self.embed_bytes + self.lm_head_bytes + self.moe_layers * self.layer_resident_bytes(True)
                + self.dense_layers * self.layer_resident_bytes(False))

    @property
    def decode_resident_bytes(self) -> int:
        """Of those, what one decoded token reads (not the embedding table)."""
        return self.resident_bytes - self.embed_bytes

    @property
    def routed_bytes(self) -> int:
        return self.moe_layers * self.layer_experts_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.routed_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache (bf16; MLA: the latent and rope key), all layers."""
        return self.n_layers * self.attn.kv_width * BF16

    @property
    def flops_per_token(self) -> float:
        """Linear layers only (no attention scores, no lm_head)."""
        return (self.moe_layers * (self.layer_resident_flops(True) + self.routed_flops_per_layer)
                + self.dense_layers * self.layer_resident_flops(False))

    def attention_flops(self, start: int, n: int) -> float:
        """One layer, queries at positions [start, start + n): scores + weighted values, causal,
        plus (MLA) the expansion of the start + n cached latents through kv_b_proj."""
        a = self.attn
        pairs = n * start + n * (n + 1) / 2
        return pairs * a.heads * a.score_flops + (start + n) * a.expand_flops_per_key

    def absorbed_attention_flops(self, context: int) -> float:
        """One layer, one decoded token over `context` cached positions, as decode attends (MLA:
        in latent space, kv_b_proj absorbed: scores over kv_lora_rank + rope, values over
        kv_lora_rank; GQA: over the cached keys and values)."""
        return float(context * self.attn.heads * self.attn.absorbed_score_flops)

    def lm_head_flops(self) -> float:
        return 2.0 * self.cfg.vocab_size * self.cfg.hidden_size

    def activation_bytes_per_token(self, scores_context: int = 0) -> int:
        """Device working set per token of a prefill chunk (bf16): residual, normed input and
        MoE output, queries and attention output, the k gathered expert inputs, the routed
        intermediates. Attention scores are blocked (a fused kernel) unless `scores_context`
        is given: then each query holds f32 scores and probabilities over that many keys per
        head, as an attention that is not blocked over keys materializes them (model/mla.py's
        is blocked)."""
        c = self.cfg
        k = c.num_experts_per_tok
        return (BF16 * (6 * c.hidden_size + k * c.hidden_size + self.attn.act_width + 2 * k * c.moe_intermediate_size)
                + 8 * self.attn.heads * scores_context)

    @property
    def expert_weights(self) -> int:
        """Weights of one routed expert (gate + up + down)."""
        return 3 * self.cfg.hidden_size * self.cfg.moe_intermediate_size

    def layer_matrices(self, moe: bool) -> list[tuple[int, int]]:
        """[n, k] of the Linears one layer applies per token as separate kernel calls: the
        attention projections (MLA's kv_b_proj excluded: `attn.absorbed_groups`), then the dense
        MLP's or the shared experts' gate, up and down."""
        c = self.cfg
        inter = c.moe_intermediate_size * shared_experts(c) if moe else c.intermediate_size
        mlp = [(inter, c.hidden_size), (inter, c.hidden_size), (c.hidden_size, inter)] if inter else []
        return list(self.attn.linears) + mlp

    def touched_experts(self, n_tokens: int) -> float:
        """Expected number of distinct experts a layer routes n tokens to (uniform routing)."""
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        return e * (1.0 - (1.0 - k / e) ** n_tokens)


def shared_experts(cfg: Any) -> int:
    """Shared experts per MoE layer (0 for a family without: Qwen3-MoE)."""
    return getattr(cfg, "n_shared_experts", 0) or 0


def model_costs(cfg: Any) -> ModelCosts:
    """The costs of a config of any family (its attention's by `attention_costs.of`)."""
    a = attention_costs.of(cfg)
    h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    lb = lambda n, k: linear_bytes(cfg, n, k)  # noqa: E731
    shared_i = i * shared_experts(cfg)
    inter = cfg.intermediate_size
    return ModelCosts(
        cfg=cfg,
        attn=a,
        n_layers=cfg.num_hidden_layers,
        moe_layers=sum(cfg.is_moe_layer(j) for j in range(cfg.num_hidden_layers)),
        attn_bytes=sum(lb(n, k) for n, k in a.linears + a.cache_matrices),
        dense_mlp_bytes=(2 * lb(inter, h) + lb(h, inter)) if inter else 0,
        moe_resident_bytes=((2 * lb(shared_i, h) + lb(h, shared_i)) if shared_i else 0) + e * h * BF16 + 4 * e,
        expert_bytes=2 * lb(i, h) + lb(h, i),
        embed_bytes=cfg.vocab_size * h * BF16,
        lm_head_bytes=cfg.vocab_size * h * BF16,
        attn_linear_flops=2.0 * sum(n * k for n, k in a.linears),
        dense_mlp_flops=6.0 * h * inter,
        moe_resident_flops=6.0 * h * shared_i + 2.0 * h * e,
        routed_flops_per_layer=6.0 * h * i * cfg.num_experts_per_tok,
    )
