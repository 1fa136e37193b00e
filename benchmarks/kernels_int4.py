"""INT4 rows of the kernel benchmark, run by `python -m benchmarks.kernels`.

The same 8 DeepSeek-V3 experts' shapes as the FP8 rows (gate/up 2048x7168, down 7168x2048),
as group-32 INT4 with f16 scales inline (random codes and scales: speed does not depend on
the values). Measured, each interleaved call by call with a read-only pass over the INT4
bytes and with the FP8 kernel on its own matrices, so drift hits all alike:
- the 24 matrices as linears for each M: time, GB/s, fraction of the read pass, speedup vs FP8;
- the fused MoE layer for one token: time, fraction of the read pass, speedup vs FP8;
- the GEMM path (prefill): the fused MoE over the 8 experts with 2 of 8 chosen per token
  (T/4 rows per expert) for T = 64, 256, 512 on the INT4 GEMM path, on the INT4 GEMV chunks and
  on the FP8 GEMM path: ms and GFLOP/s (2 x rows x N x K per active matrix).
The FP8 side runs at the precision set when called (benchmarks.kernels records its kernel
path as details.int4.fp8_kernel).

    python -m benchmarks.kernels_int4 [--json PATH] [--quick]   # the GEMM-path rows alone
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import _harness as H
from benchmarks import _kernel_cases as C
from benchmarks import _kernel_path as KP
from benchmarks._kernel_cases import HIDDEN, INT4_GROUP, INTER, N_EXPERTS

GEMM_TS_FULL, GEMM_TS_QUICK = (64, 256, 512), (64,)
GEMM_TOP_K = 2


def run(nat, rng, fp8_store, ms, repeats) -> tuple[dict, dict]:
    """(metrics, details) of the INT4 rows against `fp8_store` (an FP8 store from
    _kernel_cases.build_store) for each M in `ms`."""
    lib = nat.lib
    store = C.build_int4_store(rng)
    mats = C.store_mats(lib, store)
    fp8_mats = C.store_mats(lib, fp8_store)
    shapes = list(C.SHAPES) * N_EXPERTS
    nbytes, fp8_bytes = store.nbytes, fp8_store.nbytes
    read = H.read_pass_fn(nat, mats)
    all_threads = lib.jm_num_threads()
    details: dict = {"shapes": f"{N_EXPERTS} experts x (gate {INTER}x{HIDDEN}, up, down {HIDDEN}x{INTER}) INT4 group "
                               f"{INT4_GROUP}",
                     "bytes": nbytes, "fp8_bytes": fp8_bytes, "isa": ("scalar", "avx2", "avx512")[lib.jm_int4_isa()],
                     "gemv": {}}
    for threads in sorted({1, all_threads}):
        lib.jm_set_num_threads(threads)
        for m in ms:
            t = H.interleaved({"read": read, "int4": C.linear_case(nat, rng, m, mats, shapes),
                               "fp8": C.linear_case(nat, rng, m, fp8_mats, shapes)}, repeats)
            r = {"ms": t["int4"]["median"] * 1e3, "ms_min": t["int4"]["min"] * 1e3, "ms_max": t["int4"]["max"] * 1e3,
                 "gbps": nbytes / t["int4"]["median"] / 1e9, "read_gbps": nbytes / t["read"]["median"] / 1e9,
                 "frac_of_read": t["read"]["median"] / t["int4"]["median"], "fp8_ms": t["fp8"]["median"] * 1e3,
                 "speedup_vs_fp8": t["fp8"]["median"] / t["int4"]["median"]}
            details["gemv"][f"t{threads}_m{m}"] = r
            print(f"INT4 threads={threads} M={m:3d}: {r['ms']:8.2f} ms  {r['gbps']:5.1f} GB/s  read pass "
                  f"{r['read_gbps']:5.1f} GB/s  frac {r['frac_of_read']:.3f}  FP8 {r['fp8_ms']:8.2f} ms  "
                  f"speedup {r['speedup_vs_fp8']:.2f}x", flush=True)
    lib.jm_set_num_threads(0)

    moe = C.moe_token_case(nat, rng)
    t = H.interleaved({"read": read, "int4": moe(store), "fp8": moe(fp8_store)}, repeats)
    details["moe_m1"] = {k: {s: v * 1e3 for s, v in t[k].items() if s != "repeats"} for k in t}
    moe_frac, moe_speedup = t["read"]["median"] / t["int4"]["median"], t["fp8"]["median"] / t["int4"]["median"]
    print(f"INT4 MoE layer, 1 token: {t['int4']['median'] * 1e3:.2f} ms (read pass {t['read']['median'] * 1e3:.2f} ms, "
          f"frac {moe_frac:.3f}); FP8 {t['fp8']['median'] * 1e3:.2f} ms: {moe_speedup:.2f}x", flush=True)
    top = details["gemv"][f"t{all_threads}_m1"]
    metrics = {
        "int4_gemv_m1_frac_of_read": round(top["frac_of_read"], 4),
        "int4_gemv_m1_gbps": round(top["gbps"], 2),
        "int4_gemv_m1_speedup_vs_fp8": round(top["speedup_vs_fp8"], 3),
        "int4_moe_layer_m1_ms": round(t["int4"]["median"] * 1e3, 3),
        "int4_moe_layer_m1_frac_of_read": round(moe_frac, 4),
        "int4_moe_layer_m1_speedup_vs_fp8": round(moe_speedup, 3),
        "int4_bytes_ratio_vs_fp8": round(nbytes / fp8_bytes, 4),
    }
    gm, details["gemm"] = run_gemm(nat, rng, store, fp8_store, GEMM_TS_QUICK if tuple(ms) == (1,) else GEMM_TS_FULL,
                                   repeats)
    metrics.update(gm)
    store.free()
    return metrics, details


def run_gemm(nat, rng, store, fp8_store, ts, repeats) -> tuple[dict, dict]:
    """The fused MoE at prefill token counts: INT4 GEMM path vs its GEMV chunks vs FP8 GEMM,
    interleaved call by call with a read-only pass over the INT4 bytes."""
    lib = nat.lib
    read = H.read_pass_fn(nat, C.store_mats(lib, store))
    details: dict = {"top_k": GEMM_TOP_K, "isa": ("scalar", "avx2", "avx512")[lib.jm_int4_isa()],
                     "threads": int(lib.jm_num_threads())}
    metrics: dict = {}
    for t_ in ts:
        case = C.moe_case(nat, rng, t_, GEMM_TOP_K)
        int4, fp8 = case(store), case(fp8_store)
        t = H.interleaved({"read": read, "int4_gemm": C.with_gemm_rows(lib, int4, 1),
                           "int4_gemv": C.with_gemm_rows(lib, int4, -1),
                           "fp8_gemm": C.with_gemm_rows(lib, fp8, 1)}, repeats)
        flop = 2.0 * t_ * GEMM_TOP_K * 3 * HIDDEN * INTER
        row = {"rows_per_expert": t_ * GEMM_TOP_K / N_EXPERTS, "read_ms": t["read"]["median"] * 1e3}
        for k in ("int4_gemm", "int4_gemv", "fp8_gemm"):
            row[f"{k}_ms"] = t[k]["median"] * 1e3
            row[f"{k}_gflops"] = flop / t[k]["median"] / 1e9
        row["speedup_vs_gemv"] = t["int4_gemv"]["median"] / t["int4_gemm"]["median"]
        row["speedup_vs_fp8_gemm"] = t["fp8_gemm"]["median"] / t["int4_gemm"]["median"]
        details[f"moe_t{t_}"] = row
        print(f"INT4 MoE T={t_:4d} ({row['rows_per_expert']:.0f} rows/expert): GEMM {row['int4_gemm_ms']:8.2f} ms "
              f"{row['int4_gemm_gflops']:6.1f} GFLOP/s; GEMV chunks {row['int4_gemv_ms']:8.2f} ms "
              f"{row['int4_gemv_gflops']:6.1f}; FP8 GEMM {row['fp8_gemm_ms']:8.2f} ms {row['fp8_gemm_gflops']:6.1f}; "
              f"x{row['speedup_vs_gemv']:.2f} vs GEMV, x{row['speedup_vs_fp8_gemm']:.2f} vs FP8; "
              f"read pass {row['read_ms']:.2f} ms", flush=True)
        metrics[f"int4_moe_t{t_}_gemm_gflops"] = round(row["int4_gemm_gflops"], 2)
        metrics[f"int4_moe_t{t_}_speedup_vs_gemv"] = round(row["speedup_vs_gemv"], 3)
        metrics[f"int4_moe_t{t_}_speedup_vs_fp8_gemm"] = round(row["speedup_vs_fp8_gemm"], 3)
    return metrics, details


def main(argv=None) -> dict:
    """The GEMM-path rows alone (the full INT4 rows run inside benchmarks.kernels)."""
    ap = H.parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)

    from jaxmoe.cpu._lib import load  # noqa: PLC0415

    nat = load()
    rng = np.random.default_rng(0)
    fp8_store, _, draw = C.build_store(rng)
    store = C.build_int4_store(rng)
    metrics, details = run_gemm(nat, rng, store, fp8_store, GEMM_TS_QUICK if args.quick else GEMM_TS_FULL, repeats)
    details["fp8_weights"], details["fp8_kernel"] = draw, KP.kernel_info(nat)
    env = H.env_info(isa=nat.selected_isa(), threads=int(nat.lib.jm_num_threads()), quick=args.quick)
    doc = H.write(args.json, metrics, env, details)
    if not args.quick:
        H.write(H.default_result("kernels_int4_gemm.json"), metrics, env, details)
    print(metrics)
    store.free()
    fp8_store.free()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
