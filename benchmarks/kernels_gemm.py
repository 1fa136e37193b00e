"""CPU GEMM path benchmark: FP8 linears and the fused MoE at prefill token counts.

One DeepSeek-V3 expert's three FP8 matrices (gate/up 2048x7168, down 7168x2048) as linears for
M = 8, 16, 32, 64, 128, 512 tokens, on the GEMM path and on the GEMV token chunks (the path below
jm_gemm_min_rows), interleaved with a read-only pass over the same bytes; and the fused MoE
layer over 8 experts with 2 of 8 chosen per token (DeepSeek's 8 of 32 in proportion: each
expert sees about T/4 tokens) for T = 64, 256, 512. Reported: ms, GFLOP/s (2 M N K per matrix;
MoE: active expert rows only), the fraction of this machine's f32 FMA peak
(threads x 2 FMA pipes x 8 lanes x 2 flop x clock, clock from --ghz or /proc/cpuinfo), and the
GEMM / GEMV speedup measured in the same run.

    python -m benchmarks.kernels_gemm [--json PATH] [--quick] [--ghz 2.45] [--precision exact|bf16|both]

Weights and calls from benchmarks/_kernel_cases.py (checkpoint-like FP8); each precision
measured back to back (the bf16 rows under details.bf16 and `_bf16` metric keys); every row
names its kernel path (benchmarks/_kernel_path.py).

Results: PATH if given, and benchmarks/results/kernels_gemm.json for a full (not --quick) run.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import _harness as H
from benchmarks import _kernel_cases as C
from benchmarks import _kernel_path as KP
from benchmarks._kernel_cases import HIDDEN, INTER, N_EXPERTS

MS_FULL, MS_QUICK = (8, 16, 32, 64, 128, 512), (16, 64)
TS_FULL, TS_QUICK = (64, 256, 512), (64,)
TOP_K = 2


def clock_ghz() -> float:
    """Nominal clock from /proc/cpuinfo (the first 'cpu MHz'), 2.45 if absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1e3
    except OSError:
        pass
    return 2.45


def run(nat, rng, store, ms, ts, repeats, ghz=None) -> tuple[dict, dict]:
    """The GEMM rows on `store` (an FP8 store from _kernel_cases.build_store) at the precision set
    now: (metrics, details); details and every row name the kernel path (`kernel_info`)."""
    lib = nat.lib
    threads = lib.jm_num_threads()
    ghz = ghz or clock_ghz()
    peak = threads * 2 * 8 * 2 * ghz  # GFLOP/s
    mats = C.store_mats(lib, store, [0])
    shapes = list(C.SHAPES)
    read3 = H.read_pass_fn(nat, mats)
    info = KP.kernel_info(nat)
    details: dict = {"threads": threads, "ghz": ghz, "peak_gflops": peak, "linear": {}, "moe": {}, **info,
                     "shapes": "one expert: gate 2048x7168, up 2048x7168, down 7168x2048 FP8; MoE: 8 experts, "
                               f"top-{TOP_K} per token"}

    for m in ms:
        fn = C.linear_case(nat, rng, m, mats, shapes)
        t = H.interleaved({"read": read3, "gemm": C.with_gemm_rows(lib, fn, 1),
                           "gemv": C.with_gemm_rows(lib, fn, -1)}, repeats)
        flop = 2.0 * m * sum(n * k for n, k in shapes)
        row = {"gemm_ms": t["gemm"]["median"] * 1e3, "gemv_ms": t["gemv"]["median"] * 1e3,
               "gemm_gflops": flop / t["gemm"]["median"] / 1e9, "gemv_gflops": flop / t["gemv"]["median"] / 1e9,
               "read_ms": t["read"]["median"] * 1e3, **info}
        row["gemm_frac_of_peak"] = row["gemm_gflops"] / peak
        row["speedup_vs_gemv"] = t["gemv"]["median"] / t["gemm"]["median"]
        details["linear"][f"m{m}"] = row
        print(f"[{info['kernel_path']}] linear x3, M={m:4d}: GEMM {row['gemm_ms']:8.2f} ms "
              f"{row['gemm_gflops']:6.1f} GFLOP/s ({row['gemm_frac_of_peak']:.2f} of peak {peak:.0f}); "
              f"GEMV chunks {row['gemv_ms']:8.2f} ms "
              f"{row['gemv_gflops']:6.1f} GFLOP/s; x{row['speedup_vs_gemv']:.2f}; read pass {row['read_ms']:.2f} ms",
              flush=True)

    read_all = H.read_pass_fn(nat, C.store_mats(lib, store))
    for t_ in ts:
        moe = C.moe_case(nat, rng, t_, TOP_K)(store)
        t = H.interleaved({"read": read_all, "gemm": C.with_gemm_rows(lib, moe, 1),
                           "gemv": C.with_gemm_rows(lib, moe, -1)}, repeats)
        flop = 2.0 * t_ * TOP_K * 3 * HIDDEN * INTER
        row = {"tokens_per_expert": t_ * TOP_K / N_EXPERTS, "gemm_ms": t["gemm"]["median"] * 1e3,
               "gemv_ms": t["gemv"]["median"] * 1e3, "gemm_gflops": flop / t["gemm"]["median"] / 1e9,
               "gemv_gflops": flop / t["gemv"]["median"] / 1e9, "read_ms": t["read"]["median"] * 1e3, **info}
        row["gemm_frac_of_peak"] = row["gemm_gflops"] / peak
        row["speedup_vs_gemv"] = t["gemv"]["median"] / t["gemm"]["median"]
        details["moe"][f"t{t_}"] = row
        print(f"[{info['kernel_path']}] MoE, T={t_:4d} ({row['tokens_per_expert']:.0f} rows/expert): "
              f"GEMM {row['gemm_ms']:8.2f} ms {row['gemm_gflops']:6.1f} GFLOP/s ({row['gemm_frac_of_peak']:.2f} of peak); "
              f"GEMV chunks "
              f"{row['gemv_ms']:8.2f} ms {row['gemv_gflops']:6.1f} GFLOP/s; x{row['speedup_vs_gemv']:.2f}; "
              f"read pass {row['read_ms']:.2f} ms", flush=True)

    metrics = {f"gemm_m{m}_gflops": round(details["linear"][f"m{m}"]["gemm_gflops"], 2) for m in ms}
    metrics.update({f"gemm_m{m}_frac_of_peak": round(details["linear"][f"m{m}"]["gemm_frac_of_peak"], 4) for m in ms})
    metrics.update({f"gemm_m{m}_speedup_vs_gemv": round(details["linear"][f"m{m}"]["speedup_vs_gemv"], 2) for m in ms})
    metrics.update({f"moe_t{t_}_gflops": round(details["moe"][f"t{t_}"]["gemm_gflops"], 2) for t_ in ts})
    metrics.update({f"moe_t{t_}_speedup_vs_gemv": round(details["moe"][f"t{t_}"]["speedup_vs_gemv"], 2) for t_ in ts})
    return metrics, details


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: /proc/cpuinfo)")
    KP.add_precision_arg(ap)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    ms, ts = (MS_QUICK, TS_QUICK) if args.quick else (MS_FULL, TS_FULL)

    from jaxmoe.cpu._lib import load  # noqa: PLC0415

    nat = load()
    rng = np.random.default_rng(0)
    store, _, draw = C.build_store(rng)
    precs = KP.precisions(nat, args.precision)
    metrics, details = {}, {"weights": {draw["draw"]: draw}, "precisions": precs}
    for prec in precs:  # back to back, each block with its own read passes
        with KP.precision(nat, prec):
            m, d = run(nat, rng, store, ms, ts, repeats, args.ghz)
        metrics.update(KP.suffixed(m, prec))
        if prec == "exact":
            details.update(d)
        else:
            details[prec] = d
    env = H.env_info(isa=nat.selected_isa(), threads=int(nat.lib.jm_num_threads()), quick=args.quick, precisions=precs)
    doc = H.write(args.json, metrics, env, details)
    if not args.quick:
        H.write(H.default_result("kernels_gemm.json"), metrics, env, details)
    print(metrics)
    store.free()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
