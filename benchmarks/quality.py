"""Quality cost of the CPU expert formats: next-token distributions of INT4 and of
the CPU FP8 path against the original-precision reference forward.

    python -m benchmarks.quality [--quick] [--json PATH] [--config demo] [--checkpoint DIR] [--group 32]
                                 [--int4-scale search] [--seqs 8] [--seq-len 128]

Model: `--checkpoint DIR` (an FP8 or bf16 Hugging Face checkpoint), else a synthetic FP8
checkpoint of `--config` (default `demo`; `tiny` with --quick) written to a temporary
directory. Text: paragraphs of the Python standard library's own documentation (module
docstrings), tokenized with the checkpoint's tokenizer (random ids if it has none), cut into
`--seqs` sequences of `--seq-len` tokens.

Variants, each the full-sequence prefill forward (jaxmoe.model.forward.forward_expanded, jitted):
- reference: pure JAX in float32 on the weights as stored (FP8 blocks dequantized exactly);
- fp8_cpu:   every large matmul and the routed experts on cpu_ext (`to_cpu_placement`), in
             the exact precision (f32 activations and sums);
- fp8_cpu_bf16: the same in the bf16 precision (bf16 activations, vdpbf16ps), where the CPU
             has a bf16 dot (AVX-512 BF16);
- int4_cpu:  the routed experts converted to INT4 (`jaxmoe convert --to int4`, scale rule
             `--int4-scale`, default the converter's), on cpu_ext;
- int4_jax:  the INT4 checkpoint on the pure-JAX path (dequantized INT4, f32 activations):
             the format's own error, without the kernels' int8 activations (not in --quick);
- int4_cpu_<rule>: int4_cpu with each other scale rule of quant_int4.SCALE_RULES (not in
             --quick), so one run compares the rules on the same model and text.
Per variant: mean and max over positions of KL(reference || variant) in nats, top-1
agreement with the reference (each mean with its standard error over the sequences, `_sem`),
and the perplexity of the text. Also, per scale rule, the
round-trip relative MSE sum((deq(q(w)) - w)^2) / sum(w^2) of the group quantization alone on
Gaussian and Student-t (3 and 5 degrees of freedom: heavy tails) matrices of 256 x 7168 and
on the model's first routed expert matrices (`scale_mse`).

Results: PATH, and benchmarks/results/quality.json for the default full run (synthetic demo).

What is meaningful on random (synthetic) weights: KL and top-1 agreement measure the error of
the format and kernels relative to the reference forward (the same arithmetic a trained model
would go through, though trained weights have other outlier statistics), and comparing scale
rules on them is fair (same model, same text). Their absolute size is not a prediction for a
trained model: a random model's next-token distribution is nearly flat (top-1 margins tiny),
so top-1 agreement flips easily, and trained weights have other outliers. Perplexity is NOT
meaningful there (about the vocabulary size whatever the format); it is reported for trained
checkpoints. The round-trip MSE is meaningful as a property of the format on the stated
distributions.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import _harness as H

TEXT_MODULES = ("json", "collections", "itertools", "functools", "textwrap", "argparse", "string", "pathlib",
                "datetime", "heapq", "bisect", "statistics", "fractions", "decimal", "difflib", "csv")


def text_corpus() -> str:
    docs = []
    for name in TEXT_MODULES:
        doc = importlib.import_module(name).__doc__
        if doc:
            docs.append(doc.strip())
    return "\n\n".join(docs)


def sequences(path: Path, vocab: int, n: int, length: int) -> np.ndarray:
    from jaxmoe.tokenizer import Tokenizer  # noqa: PLC0415

    try:
        ids = Tokenizer.from_dir(path).encode(text_corpus(), add_special_tokens=False)
    except Exception:  # no tokenizer: random ids (the figures then measure the same error)
        ids = []
    if len(ids) < n * length:
        ids = list(ids) + np.random.default_rng(0).integers(0, vocab, n * length - len(ids)).tolist()
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def log_probs(cfg, weights, seqs: np.ndarray) -> np.ndarray:
    """float64 log-softmax of the prefill logits, [n, L, V]."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxmoe.model import cache as cache_mod  # noqa: PLC0415
    from jaxmoe.model import forward  # noqa: PLC0415

    fn = jax.jit(forward.forward_expanded, static_argnums=0)
    n, length = seqs.shape
    out = []
    for s in seqs:
        cache = cache_mod.init_cache(cfg, 1, length)
        logits, _ = fn(cfg, weights, cache, jnp.asarray(s[None]), jnp.arange(length, dtype=jnp.int32)[None])
        lg = np.asarray(logits[0], np.float64)
        lg -= lg.max(-1, keepdims=True)
        out.append(lg - np.log(np.exp(lg).sum(-1, keepdims=True)))
    return np.stack(out)


def compare(ref: np.ndarray, var: np.ndarray, seqs: np.ndarray) -> dict:
    p = np.exp(ref)
    kl = (p * (ref - var)).sum(-1)  # [n, L]
    agree = ref.argmax(-1) == var.argmax(-1)
    n = len(kl)  # spread over sequences (positions inside one are correlated): standard errors of the means
    sem = lambda v: float(v.mean(-1).std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agree": float(agree.mean()),
            "kl_mean_sem": sem(kl), "top1_agree_sem": sem(agree.astype(np.float64)), "ppl": perplexity(var, seqs)}


def perplexity(lp: np.ndarray, seqs: np.ndarray) -> float:
    nll = -np.take_along_axis(lp[:, :-1], seqs[:, 1:, None], -1)[..., 0]
    return float(np.exp(nll.mean()))


def scale_mse(expert_weights: dict[str, np.ndarray], group: int) -> dict[str, dict[str, float]]:
    """{distribution: {rule: round-trip relative MSE}} of the INT4 group quantization."""
    from jaxmoe import quant_int4  # noqa: PLC0415

    rng = np.random.default_rng(0)
    dists = {"gaussian": rng.standard_normal((256, 7168)), "student_t5": rng.standard_t(5, (256, 7168)),
             "student_t3": rng.standard_t(3, (256, 7168)), **expert_weights}
    out = {}
    for name, w in dists.items():
        w = np.asarray(w, np.float32)
        den = float((w.astype(np.float64) ** 2).sum())
        out[name] = {}
        for rule in quant_int4.SCALE_RULES:
            q, s = quant_int4.quantize_int4(w, group, name, rule)
            wd = quant_int4.dequantize_int4(q, s, w.shape[-1], group, np.float64)
            out[name][rule] = float(((wd - w) ** 2).sum() / den)
    return out


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="synthetic model config (default demo; tiny with --quick)")
    ap.add_argument("--checkpoint", default=None, help="an FP8 or bf16 checkpoint directory instead of a synthetic one")
    ap.add_argument("--group", type=int, default=32, help="INT4 group size")
    ap.add_argument("--int4-scale", default=None, help="INT4 scale rule of int4_cpu (default: the converter's)")
    ap.add_argument("--seqs", type=int, default=None, help="sequences (default 8; 2 with --quick)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; 32 with --quick)")
    args = ap.parse_args(argv)
    n, length = args.seqs or (2 if args.quick else 8), args.seq_len or (32 if args.quick else 128)

    import jaxmoe.cpu as jcpu  # noqa: PLC0415
    from jaxmoe import quant_int4  # noqa: PLC0415
    from jaxmoe.config import ModelConfig  # noqa: PLC0415
    from jaxmoe.cpu import _lib  # noqa: PLC0415
    from jaxmoe.loading import hf_map  # noqa: PLC0415
    from jaxmoe.loading.convert import convert_int4, expert_float  # noqa: PLC0415
    from jaxmoe.loading.loader import load_checkpoint, open_checkpoint  # noqa: PLC0415
    from jaxmoe.loading.synthetic import write_synthetic_checkpoint  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="jaxmoe_quality_") as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            src, model = Path(args.checkpoint), str(args.checkpoint)
        else:
            model = args.config or ("tiny" if args.quick else "demo")
            print(f"writing a synthetic FP8 checkpoint of {model!r} ...", flush=True)
            src = write_synthetic_checkpoint(tmp / "fp8", ModelConfig.named(model), fmt="fp8", seed=0)
        rule = quant_int4.check_scale_rule(args.int4_scale or quant_int4.DEFAULT_SCALE_RULE)
        others = [] if args.quick else [r for r in quant_int4.SCALE_RULES if r != rule]
        cfg, weights = load_checkpoint(src)
        seqs = sequences(src, cfg.vocab_size, n, length)
        results, lps = {}, {}
        lps["reference"] = log_probs(cfg, weights, seqs)
        placed = jcpu.to_cpu_placement(weights, cfg=cfg)
        nat = _lib.load()
        with nat.use_precision("exact"):
            lps["fp8_cpu"] = log_probs(cfg, placed, seqs)
        with nat.use_precision("bf16"):
            if nat.numerics() == "bf16":  # a path with bf16 dot products (AVX-512 BF16)
                lps["fp8_cpu_bf16"] = log_probs(cfg, placed, seqs)
        jcpu.release(placed)
        for r in [rule, *others]:
            print(f"converting the routed experts to INT4 (group {args.group}, {r} scales) ...", flush=True)
            int4 = convert_int4(src, tmp / f"int4-{r}", group=args.group, scale_rule=r)
            _, w4 = load_checkpoint(int4)
            key = "int4_cpu" if r == rule else f"int4_cpu_{r}"
            if r == rule and not args.quick:  # one compile less in CI
                lps["int4_jax"] = log_probs(cfg, w4, seqs)
            placed4 = jcpu.to_cpu_placement(w4, cfg=cfg)
            lps[key] = log_probs(cfg, placed4, seqs)
            jcpu.release(placed4)
            del w4, placed4
        with open_checkpoint(src) as ck:  # the first routed expert's matrices, as the converter reads them
            first = hf_map.expert_tensors(cfg, next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)))
            experts = {f"model_{p}": expert_float(ck, first[p][0].name) for p in ("gate_proj", "down_proj")}
        mse = scale_mse(experts, args.group)
    results["reference"] = {"ppl": perplexity(lps["reference"], seqs)}
    variants = [k for k in ("fp8_cpu", "fp8_cpu_bf16", "int4_jax", "int4_cpu", *(f"int4_cpu_{r}" for r in others)) if k in lps]
    for k in variants:
        results[k] = compare(lps["reference"], lps[k], seqs)
        r = results[k]
        print(f"{k:9s}: KL mean {r['kl_mean']:.3e} (+- {r['kl_mean_sem']:.1e}) max {r['kl_max']:.3e} nats, "
              f"top-1 agreement {r['top1_agree']:.4f} (+- {r['top1_agree_sem']:.4f}), "
              f"ppl {r['ppl']:.2f} (reference {results['reference']['ppl']:.2f})", flush=True)
    for dist, by_rule in mse.items():
        print(f"round-trip relative MSE, {dist}: " + ", ".join(f"{r} {v:.5f}" for r, v in by_rule.items()), flush=True)
    synthetic = not args.checkpoint
    sig = lambda v: float(f"{v:.6g}")  # noqa: E731
    metrics = {f"{k}_{s}": sig(results[k][s]) for k in variants for s in ("kl_mean", "kl_max", "top1_agree")}
    metrics.update({f"ppl_{k}": sig(results[k]["ppl"]) for k in ("reference", "fp8_cpu", "int4_cpu")})
    metrics.update({f"int4_mse_{d}_{r}": sig(v) for d in ("gaussian", "student_t3") for r, v in mse[d].items()})
    details = {"model": model, "synthetic_weights": synthetic, "group": args.group, "int4_scale_rule": rule,
               "sequences": n, "seq_len": length,
               "positions": n * length, "text": f"docstrings of {', '.join(TEXT_MODULES)}", "results": results,
               "scale_mse": mse,
               "meaning": ("random weights: KL and top-1 agreement measure format/kernel error relative to the "
                           "reference and compare the INT4 scale rules fairly, but their size does not predict a "
                           "trained model's (flat next-token distributions flip top-1 easily); perplexity is not "
                           "meaningful; the round-trip MSE is a property of the format on the stated distributions"
                           if synthetic else "trained weights: all figures meaningful")}
    env = H.env_info(isa=jcpu._lib.load().selected_isa(), quick=args.quick)
    doc = H.write(args.json, metrics, env, details)
    if not args.quick and not args.checkpoint and model == "demo":  # the default run is the committed one
        H.write(H.default_result("quality.json"), metrics, env, details)
    print(metrics)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
