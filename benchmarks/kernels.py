"""CPU kernel benchmark: FP8 GEMV/GEMM and the fused MoE layer at DeepSeek-V3 expert shapes.

One layer's 8 active experts (gate/up 2048x7168, down 7168x2048: 24 matrices, 352 MB, far
beyond the caches) are packed into an ExpertStore (benchmarks/_kernel_cases.py). The weights
are drawn as checkpoints are made (Gaussian, 128x128 block scales: benchmarks/_fp8_draws.py);
details.weights records each draw's fraction of subnormal and zero codes. At each precision
measured (`--precision`, back to back, each timing paired with its own read pass), with 1
thread and all threads:
- the 24 matrices as linears for M = 1, 2, 4, 8, 16, 64 tokens: time, GB/s, and the fraction
  of a read-only pass over the same packed bytes timed in the same run, interleaved;
- the fused MoE layer for one token (8 experts, direct call and through XLA in jax.jit);
- subnormal_heavy: the same 24 matrices with uniformly drawn codes (~6 % subnormal) at M = 1,
  vs the checkpoint-like ones (CPUs that assist denormal FMAs in microcode slow down here);
- GEMM-path rows (benchmarks/kernels_gemm.py): one expert's matrices at M = 64, 128, 512 and
  the MoE at 256, 512 tokens: GFLOP/s, fraction of the f32 FMA peak, speedup over the GEMV
  chunks; `--no-gemm` skips them.
Then, at the first precision: dequantize-then-GEMV baselines (numpy and XLA, f32) on one
expert's three matrices, and the INT4 rows (benchmarks/kernels_int4.py): the same shapes as
group-32 INT4, vs the read pass over the INT4 bytes and vs FP8; `--no-int4` skips them.

Every row names the kernel that ran (`isa`, `precision`, `bf16_dot`, `kernel_path`:
benchmarks/_kernel_path.py); rows at a precision other than exact carry a `_<precision>`
suffix in their metric and detail keys (`gemv_bf16`, `fp8_gemv_m1_frac_of_read_bf16`, ...).
The env header names the CPU (model, class, flags).

    python -m benchmarks.kernels [--json PATH] [--quick] [--precision exact|bf16|both]

Results: PATH if given, and benchmarks/results/kernels.json for a full (not --quick) run. A full
run at the exact precision also writes the planner's calibration of this box
(jaxmoe/planning/hardware.py `calibration_path()`: $JAXMOE_CALIBRATION, else
<cache>/calibration/kernels.json with <cache> = $JAXMOE_CACHE_DIR or ~/.cache/jaxmoe).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import _harness as H
from benchmarks import _kernel_cases as C
from benchmarks import _kernel_path as KP
from benchmarks import kernels_gemm, kernels_int4
from benchmarks._kernel_cases import HIDDEN, INTER, N_EXPERTS, SHAPES

MS_FULL, MS_QUICK = (1, 2, 4, 8, 16, 64), (1, 8)


def _row(t: dict, key: str, nbytes: int, info: dict) -> dict:
    """A GEMV row from H.interleaved timings holding `key` and "read" over `nbytes`."""
    return {"ms": t[key]["median"] * 1e3, "ms_min": t[key]["min"] * 1e3, "ms_max": t[key]["max"] * 1e3,
            "gbps": nbytes / t[key]["median"] / 1e9, "read_gbps": nbytes / t["read"]["median"] / 1e9,
            "frac_of_read": t["read"]["median"] / t[key]["median"], **info}


def subnormal_heavy_row(nat, rng, store, heavy_store, repeats: int, info: dict) -> dict:
    """M = 1 on all threads over all matrices of layer 0: the subnormal-heavy draw (`heavy_store`)
    and the checkpoint-like one (`store`, same shapes), interleaved with a read-only pass over
    the heavy matrices; slowdown = heavy ms / checkpoint-like ms."""
    heavy, plain = C.store_mats(nat.lib, heavy_store), C.store_mats(nat.lib, store)
    shapes = list(SHAPES) * N_EXPERTS
    t = H.interleaved({"read": H.read_pass_fn(nat, heavy), "heavy": C.linear_case(nat, rng, 1, heavy, shapes),
                       "plain": C.linear_case(nat, rng, 1, plain, shapes)}, repeats)
    row = _row(t, "heavy", heavy_store.nbytes, info)
    row["checkpoint_like_ms"] = t["plain"]["median"] * 1e3
    row["checkpoint_like_frac_of_read"] = t["read"]["median"] / t["plain"]["median"]
    row["slowdown_vs_checkpoint_like"] = t["heavy"]["median"] / t["plain"]["median"]
    return row


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--no-int4", action="store_true", help="skip the INT4 rows")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM-path rows (benchmarks/kernels_gemm.py)")
    KP.add_precision_arg(ap)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    ms = MS_QUICK if args.quick else MS_FULL

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxmoe import quant  # noqa: PLC0415
    from jaxmoe.cpu import ops  # noqa: PLC0415
    from jaxmoe.cpu._lib import load  # noqa: PLC0415
    from jaxmoe.cpu.reference import fp8_decode  # noqa: PLC0415
    from jaxmoe.planning.hardware import calibration_path  # noqa: PLC0415

    nat = load()
    lib = nat.lib
    precs = KP.precisions(nat, args.precision)
    rng = np.random.default_rng(0)
    store, expert0, draw = C.build_store(rng)
    heavy_store, _, heavy_draw = C.build_store(rng, "uniform_codes")
    print(f"FP8 weights: {draw['draw']} {draw['subnormal_frac']:.2e} subnormal, {draw['zero_frac']:.2e} zero codes; "
          f"subnormal-heavy row: {heavy_draw['draw']} {heavy_draw['subnormal_frac']:.3f} subnormal", flush=True)
    mats = C.store_mats(lib, store)
    shapes = list(SHAPES) * N_EXPERTS
    total_bytes = store.nbytes
    read_all = H.read_pass_fn(nat, mats)
    all_threads = lib.jm_num_threads()
    details: dict = {"shapes": "8 experts x (gate 2048x7168, up 2048x7168, down 7168x2048) FP8", "bytes": total_bytes,
                     "weights": {draw["draw"]: draw, heavy_draw["draw"]: heavy_draw},
                     "precisions": precs, "kernel_paths": {}}

    # fused MoE layer, one token, the 8 experts; direct and through XLA
    moe_case = C.moe_token_case(nat, rng)
    moe_direct = moe_case(store)
    layer = store.layer(0)
    moe_jit = jax.jit(lambda x, i, w: ops.moe_experts(x, i, w, layer))
    xj, ij, wj = jnp.asarray(moe_case.x), jnp.asarray(moe_case.ids), jnp.asarray(moe_case.wts)

    metrics: dict = {}
    for prec in precs:  # back to back; every timing paired with a read pass in its own block
        with KP.precision(nat, prec):
            info = KP.kernel_info(nat)
            sfx = KP.suffix(prec)
            label = f"[{info['kernel_path']}, {info['precision'] or 'fixed'} precision]"
            details["kernel_paths"][prec] = info
            rows = details[f"gemv{sfx}"] = {}
            for threads in sorted({1, all_threads}):
                lib.jm_set_num_threads(threads)
                for m in ms:
                    t = H.interleaved({"read": read_all, "gemv": C.linear_case(nat, rng, m, mats, shapes)}, repeats)
                    r = rows[f"t{threads}_m{m}"] = _row(t, "gemv", total_bytes, info)
                    print(f"{label} threads={threads} M={m:3d}: {r['ms']:8.2f} ms  {r['gbps']:5.1f} GB/s  "
                          f"read pass {r['read_gbps']:5.1f} GB/s  frac {r['frac_of_read']:.3f}", flush=True)
            lib.jm_set_num_threads(0)

            # XLA's own worker threads spin after a call and would slow the direct measurement: the
            # XLA path is timed afterwards, against its own read pass
            t = H.interleaved({"read": read_all, "moe": moe_direct}, repeats)
            tx = H.interleaved({"read": read_all, "moe_xla": lambda: moe_jit(xj, ij, wj).block_until_ready()}, repeats)
            moe = details[f"moe_m1{sfx}"] = {k: {s: v * 1e3 for s, v in t[k].items() if s != "repeats"} for k in t}
            moe["moe_xla"] = {s: v * 1e3 for s, v in tx["moe_xla"].items() if s != "repeats"}
            moe["moe_xla_frac_of_read"] = tx["read"]["median"] / tx["moe_xla"]["median"]
            moe.update(info)
            moe_ms, moe_frac = t["moe"]["median"] * 1e3, t["read"]["median"] / t["moe"]["median"]
            print(f"{label} MoE layer, 1 token: {moe_ms:.2f} ms direct (read pass {t['read']['median'] * 1e3:.2f} ms, "
                  f"frac {moe_frac:.3f}); {tx['moe_xla']['median'] * 1e3:.2f} ms via XLA "
                  f"(frac {moe['moe_xla_frac_of_read']:.3f})", flush=True)

            heavy = details[f"subnormal_heavy{sfx}"] = subnormal_heavy_row(nat, rng, store, heavy_store, repeats, info)
            heavy["draw"] = heavy_draw["draw"]
            print(f"{label} subnormal-heavy ({heavy_draw['subnormal_frac']:.1%} subnormal codes), M=1: "
                  f"{heavy['ms']:.2f} ms, frac {heavy['frac_of_read']:.3f}; checkpoint-like {heavy['checkpoint_like_ms']:.2f}"
                  f" ms: x{heavy['slowdown_vs_checkpoint_like']:.2f} slower", flush=True)

            top = rows[f"t{all_threads}_m1"]
            metrics.update(KP.suffixed({
                "fp8_gemv_m1_frac_of_read": round(top["frac_of_read"], 4),
                "fp8_gemv_m1_gbps": round(top["gbps"], 2),
                "read_pass_gbps": round(top["read_gbps"], 2),
                "moe_layer_m1_ms": round(moe_ms, 3),
                "moe_layer_m1_xla_ms": round(moe["moe_xla"]["median"], 3),
                "moe_layer_m1_frac_of_read": round(moe_frac, 4),
                "fp8_gemv_m1_subnormal_heavy_frac_of_read": round(heavy["frac_of_read"], 4),
                "fp8_gemv_m1_subnormal_heavy_slowdown": round(heavy["slowdown_vs_checkpoint_like"], 3),
            }, prec))
            if not args.no_gemm:  # GEMM path rows (prefill): benchmarks/kernels_gemm.py
                ms_g, ts_g = (kernels_gemm.MS_QUICK, kernels_gemm.TS_QUICK) if args.quick else ((64, 128, 512), (256, 512))
                mg, details[f"gemm{sfx}"] = kernels_gemm.run(nat, rng, store, ms_g, ts_g, max(2, repeats // 2))
                metrics.update(KP.suffixed(mg, prec))
    heavy_store.free()

    # the rest at the first precision measured (exact where there is a choice)
    with KP.precision(nat, precs[0]):
        # dequantize-then-GEMV baselines on expert 0's three matrices (M = 1, f32)
        lut = fp8_decode(np.arange(256, dtype=np.uint8)).astype(np.float32)
        xs = {k: rng.standard_normal(k).astype(np.float32) for k in (HIDDEN, INTER)}

        def numpy_baseline():
            for w in expert0:
                n, k = w.shape
                codes = np.asarray(w.weight).view(np.uint8)
                s = np.repeat(np.repeat(w.weight_scale_inv, 128, 0), 128, 1)[:n, :k]
                (lut[codes] * s) @ xs[k]

        xla_deq = jax.jit(lambda w, x: quant.dequantize(w, jnp.float32) @ x)
        dev = [(jax.device_put(w), jnp.asarray(xs[w.shape[1]])) for w in expert0]

        def xla_baseline():
            for w, x in dev:
                xla_deq(w, x).block_until_ready()

        t = H.interleaved({"kernel": C.linear_case(nat, rng, 1, mats[:3], shapes[:3]), "numpy": numpy_baseline,
                           "xla": xla_baseline}, max(2, repeats // 2))
        details["dequant_baseline_3mat_ms"] = {k: v["median"] * 1e3 for k, v in t.items()}
        details["dequant_baseline_kernel"] = KP.kernel_info(nat)
        speedup = min(t["numpy"]["median"], t["xla"]["median"]) / t["kernel"]["median"]
        metrics["speedup_vs_dequant"] = round(speedup, 2)
        print(f"dequantize-then-GEMV (3 matrices): numpy {t['numpy']['median'] * 1e3:.1f} ms, "
              f"XLA {t['xla']['median'] * 1e3:.1f} ms, kernel {t['kernel']['median'] * 1e3:.2f} ms: {speedup:.1f}x",
              flush=True)
        if not args.no_int4:  # INT4 rows, against the FP8 kernel at this precision
            m4, details["int4"] = kernels_int4.run(nat, rng, store, (1,) if args.quick else ms, repeats)
            details["int4"]["fp8_kernel"] = KP.kernel_info(nat)
            metrics.update(m4)
    env = H.env_info(isa=nat.selected_isa(), threads=all_threads, quick=args.quick, precisions=precs,
                     kernel_paths=details["kernel_paths"])
    doc = H.write(args.json, metrics, env, details)
    if not args.quick:
        H.write(H.default_result("kernels.json"), metrics, env, details)
        if "fp8_gemv_m1_frac_of_read" in metrics:  # the exact-precision GEMV: this box's calibration
            H.write(calibration_path(), metrics, env, details)
            print(f"calibration for the planner written to {calibration_path()}")
    print({k: v for k, v in metrics.items()})
    store.free()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
