"""benchmarks/prefix.py `--quick` (demo model, scaled-down chat and agent workloads): the JSON layout,
that the prefix cache served every turn / call after the first and the uncached engine never,
and that both engines generated the same greedy tokens. No timing assertions (the machine is shared)."""

from __future__ import annotations

import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_quick(tmp_path, run_quick):
    committed = sorted((ROOT / "benchmarks" / "results").rglob("prefix*.json"))
    before = {p: p.read_bytes() for p in committed}
    doc = run_quick("prefix", tmp_path, timeout=400, cache_dir=tmp_path / "cache")
    m, res = doc["metrics"], doc["details"]["results"]
    assert m["model"] == "demo" and m["target_ttft_ratio"] == 0.15
    assert isinstance(m["target_met"], bool) and m["target_met"] == (m["chat_target_met"] and m["agent_target_met"])
    sz = res["sizes"]
    for w, n, new in (("chat", sz["turns"], sz["reply"]), ("agent", sz["calls"], sz["agent_new"])):
        runs = res[w]["runs"]
        cached, uncached = runs["cached"], runs["uncached"]
        assert len(cached) == len(uncached) == n >= 2
        assert len(m[f"{w}_ttft_ratios"]) == n - 1
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in m[f"{w}_ttft_ratios"])
        for i, (c, u) in enumerate(zip(cached, uncached)):
            assert c["prompt_tokens"] == u["prompt_tokens"]
            assert c["generated_tokens"] == u["generated_tokens"] == new
            assert c["output_ids"] == u["output_ids"], (w, i + 1)  # greedy: identical with and without the cache
            assert u["cached_tokens"] == 0 and u["computed_tokens"] == u["prompt_tokens"], (w, i + 1, u)
            for r in (c, u):  # what the executor ran before the first token is what the cache left to compute
                assert r["computed_tokens"] == r["prompt_tokens"] - r["cached_tokens"] == r["executor_prompt_positions"]
                assert r["ttft_s"] > 0 and r["wall_s"] >= r["ttft_s"]
            if i == 0:
                assert c["cached_tokens"] == 0  # the warm-up pass used other token ids
            else:
                assert c["cached_tokens"] > 0 and c["computed_tokens"] < u["computed_tokens"], (w, i + 1, c)
                if w == "agent":  # the shared prefix's full blocks (each call's own suffix follows them)
                    assert c["cached_tokens"] == sz["agent_prefix"] // res["kv_block_size"] * res["kv_block_size"]
                else:  # the whole history written so far: the previous prompt and reply (its last token never fed)
                    assert c["cached_tokens"] == cached[i - 1]["prompt_tokens"] + new - 1, (i + 1, c)
        cmp_ = res[w]["compare"]
        assert cmp_["same_tokens"] is True and m[f"{w}_same_tokens"] is True
        t = cmp_["totals"]
        assert t["cached"]["prefill_tokens_computed"] < t["uncached"]["prefill_tokens_computed"]
        assert m[f"{w}_prefill_tokens_computed_cached"] == sum(r["computed_tokens"] for r in cached)
        assert m[f"{w}_prefill_tokens_computed_uncached"] == sum(r["prompt_tokens"] for r in uncached)
        for mode in ("cached", "uncached"):
            assert m[f"{w}_wall_s_{mode}"] > 0 and m[f"{w}_throughput_tok_s_{mode}"] > 0
    # the chat resends its history: each turn's prompt is the previous prompt + its reply + a new user message
    chat = res["chat"]["runs"]["cached"]
    assert [r["prompt_tokens"] for r in chat] == res["chat_prompt_tokens"]
    assert all(b["prompt_tokens"] == a["prompt_tokens"] + sz["reply"] + sz["user"] for a, b in zip(chat, chat[1:]))
    assert doc["env"]["quick"] is True and doc["env"]["cpu_class"]
    # --quick never touches the committed results
    assert sorted((ROOT / "benchmarks" / "results").rglob("prefix*.json")) == committed
    assert all(p.read_bytes() == b for p, b in before.items())
