"""CPU kernel benchmark: FP8 GEMV/GEMM and the fused MoE layer at DeepSeek-V3 expert shapes.

One layer's 8 active experts (gate/up 2048x7168, down 7168x2048: 24 matrices, 352 MB, far
beyond the caches) are packed into an ExpertStore. Measured, with 1 thread and all threads:
- the 24 matrices as linears for M = 1, 2, 4, 8, 16, 64 tokens: time, GB/s, and the fraction
  of a read-only pass over the same packed bytes timed in the same run, interleaved;
- the fused MoE layer for one token (8 experts, direct call and through XLA in jax.jit);
- dequantize-then-GEMV baselines (numpy and XLA, f32) on one expert's three matrices;
- INT4 rows (benchmarks/kernels_int4.py): the same shapes as group-32 INT4, vs the read pass
  over the INT4 bytes and vs FP8 (per-matrix and MoE-layer speedups); `--no-int4` skips them;
- GEMM-path rows (benchmarks/kernels_gemm.py): one expert's matrices at M = 64, 128, 512 and
  the MoE at 256, 512 tokens: GFLOP/s, fraction of the f32 FMA peak, speedup over the GEMV
  chunks; `--no-gemm` skips them.

    python -m benchmarks.kernels [--json PATH] [--quick]

Results: PATH if given, and benchmarks/results/kernels.json for a full (not --quick) run.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import _harness as H

HIDDEN, INTER, N_EXPERTS = 7168, 2048, 8
MS_FULL, MS_QUICK = (1, 2, 4, 8, 16, 64), (1, 8)


def build_store(rng):
    """An ExpertStore with one layer of N_EXPERTS random FP8 experts; expert 0's codes and
    scales are kept for the dequantize baselines."""
    from jaxmoe import quant  # noqa: PLC0415
    from jaxmoe.cpu.expert_store import ExpertStore, HostMatrix  # noqa: PLC0415

    store = ExpertStore(1)
    store.init_layer(0, N_EXPERTS, HIDDEN, INTER)
    kept = None
    for e in range(N_EXPERTS):
        mats, raw = [], []
        for n, k in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)):
            q = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
            q[(q & 0x7F) == 0x7F] ^= 1  # no NaN codes, as in a checkpoint
            s = (rng.uniform(0.5, 2.0, size=(-(-n // 128), -(-k // 128))) * 1e-3).astype(np.float32)
            mats.append(HostMatrix.fp8(q, s))
            raw.append(quant.Fp8Weight(weight=q.view(quant.FP8_DTYPE), weight_scale_inv=s) if e == 0 else None)
        store.set_expert(0, e, *mats)
        kept = kept or raw
    return store, kept


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--no-int4", action="store_true", help="skip the INT4 rows")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM-path rows (benchmarks/kernels_gemm.py)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    ms = MS_QUICK if args.quick else MS_FULL

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxmoe import quant  # noqa: PLC0415
    from jaxmoe.cpu import ops  # noqa: PLC0415
    from jaxmoe.cpu._lib import load  # noqa: PLC0415
    from jaxmoe.cpu.reference import fp8_decode  # noqa: PLC0415

    nat = load()
    ffi, lib = nat.ffi, nat.lib
    rng = np.random.default_rng(0)
    store, expert0 = build_store(rng)
    mats = [lib.jm_store_matrix(store._ptr, 0, e, j) for e in range(N_EXPERTS) for j in range(3)]
    shapes = [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)] * N_EXPERTS
    total_bytes = store.nbytes
    read_all = H.read_pass_fn(nat, mats)
    all_threads = lib.jm_num_threads()
    details: dict = {"shapes": "8 experts x (gate 2048x7168, up 2048x7168, down 7168x2048) FP8", "bytes": total_bytes,
                     "gemv": {}, "read": {}}

    def gemv_pass(m: int, mat_list=mats, shape_list=shapes):
        xs = {k: rng.standard_normal((m, k)).astype(np.float32) for k in (HIDDEN, INTER)}
        ys = {n: np.empty((m, n), np.float32) for n in (HIDDEN, INTER)}
        args_ = [(w, ffi.cast("void *", xs[k].ctypes.data), ffi.cast("void *", ys[n].ctypes.data))
                 for w, (n, k) in zip(mat_list, shape_list)]

        def run(_keep=(xs, ys)):  # the casts above do not keep the arrays alive
            for w, xp, yp in args_:
                lib.jm_linear(w, xp, 0, m, yp, 0)
        return run

    for threads in sorted({1, all_threads}):
        lib.jm_set_num_threads(threads)
        for m in ms:
            t = H.interleaved({"read": read_all, "gemv": gemv_pass(m)}, repeats)
            key = f"t{threads}_m{m}"
            details["gemv"][key] = {"ms": t["gemv"]["median"] * 1e3, "ms_min": t["gemv"]["min"] * 1e3,
                                    "ms_max": t["gemv"]["max"] * 1e3,
                                    "gbps": total_bytes / t["gemv"]["median"] / 1e9,
                                    "read_gbps": total_bytes / t["read"]["median"] / 1e9,
                                    "frac_of_read": t["read"]["median"] / t["gemv"]["median"]}
            print(f"threads={threads} M={m:3d}: {details['gemv'][key]['ms']:8.2f} ms  "
                  f"{details['gemv'][key]['gbps']:5.1f} GB/s  read pass {details['gemv'][key]['read_gbps']:5.1f} GB/s  "
                  f"frac {details['gemv'][key]['frac_of_read']:.3f}", flush=True)
    lib.jm_set_num_threads(0)

    # fused MoE layer, one token, the 8 experts; direct and through XLA
    x1 = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    ids = np.arange(N_EXPERTS, dtype=np.int32)[None]
    wts = rng.random((1, N_EXPERTS)).astype(np.float32)
    out = np.empty_like(x1)
    c = ffi.cast
    moe_args = (store._ptr, 0, c("void *", x1.ctypes.data), 0, 1, c("int32_t *", ids.ctypes.data),
                c("float *", wts.ctypes.data), N_EXPERTS, c("void *", out.ctypes.data), 0)
    layer = store.layer(0)
    moe_jit = jax.jit(lambda x, i, w: ops.moe_experts(x, i, w, layer))
    xj, ij, wj = jnp.asarray(x1), jnp.asarray(ids), jnp.asarray(wts)
    # XLA's own worker threads spin after a call and would slow the direct measurement: the
    # XLA path is timed afterwards, against its own read pass
    t = H.interleaved({"read": read_all, "moe": lambda: lib.jm_moe(*moe_args)}, repeats)
    tx = H.interleaved({"read": read_all, "moe_xla": lambda: moe_jit(xj, ij, wj).block_until_ready()}, repeats)
    details["moe_m1"] = {k: {s: v * 1e3 for s, v in t[k].items() if s != "repeats"} for k in t}
    details["moe_m1"]["moe_xla"] = {s: v * 1e3 for s, v in tx["moe_xla"].items() if s != "repeats"}
    details["moe_m1"]["moe_xla_frac_of_read"] = tx["read"]["median"] / tx["moe_xla"]["median"]
    moe_ms, moe_frac = t["moe"]["median"] * 1e3, t["read"]["median"] / t["moe"]["median"]
    print(f"MoE layer, 1 token: {moe_ms:.2f} ms direct (read pass {t['read']['median'] * 1e3:.2f} ms, frac {moe_frac:.3f}); "
          f"{tx['moe_xla']['median'] * 1e3:.2f} ms via XLA (frac {details['moe_m1']['moe_xla_frac_of_read']:.3f})", flush=True)

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

    t = H.interleaved({"kernel": gemv_pass(1, mats[:3], shapes[:3]), "numpy": numpy_baseline, "xla": xla_baseline},
                      max(2, repeats // 2))
    details["dequant_baseline_3mat_ms"] = {k: v["median"] * 1e3 for k, v in t.items()}
    speedup = min(t["numpy"]["median"], t["xla"]["median"]) / t["kernel"]["median"]
    print(f"dequantize-then-GEMV (3 matrices): numpy {t['numpy']['median'] * 1e3:.1f} ms, "
          f"XLA {t['xla']['median'] * 1e3:.1f} ms, kernel {t['kernel']['median'] * 1e3:.2f} ms: {speedup:.1f}x", flush=True)

    top = details["gemv"][f"t{all_threads}_m1"]
    metrics = {
        "fp8_gemv_m1_frac_of_read": round(top["frac_of_read"], 4),
        "fp8_gemv_m1_gbps": round(top["gbps"], 2),
        "read_pass_gbps": round(top["read_gbps"], 2),
        "moe_layer_m1_ms": round(moe_ms, 3),
        "moe_layer_m1_xla_ms": round(details["moe_m1"]["moe_xla"]["median"], 3),
        "moe_layer_m1_frac_of_read": round(moe_frac, 4),
        "speedup_vs_dequant": round(speedup, 2),
    }
    if not args.no_int4:  # INT4 rows (issue 7)
        from benchmarks import kernels_int4  # noqa: PLC0415

        m4, details["int4"] = kernels_int4.run(nat, rng, store, gemv_pass, (1,) if args.quick else ms, repeats, HIDDEN,
                                                   INTER, N_EXPERTS)
        metrics.update(m4)
    if not args.no_gemm:  # GEMM path rows (prefill): benchmarks/kernels_gemm.py
        from benchmarks import kernels_gemm  # noqa: PLC0415

        ms_g, ts_g = (kernels_gemm.MS_QUICK, kernels_gemm.TS_QUICK) if args.quick else ((64, 128, 512), (256, 512))
        mg, details["gemm"] = kernels_gemm.run(nat, rng, store, ms_g, ts_g, max(2, repeats // 2))
        metrics.update(mg)
    env = H.env_info(isa=nat.selected_isa(), threads=all_threads, quick=args.quick)
    doc = H.write(args.json, metrics, env, details)
    if not args.quick:
        H.write(H.RESULTS_DIR / "kernels.json", metrics, env, details)
    print({k: v for k, v in metrics.items()})
    store.free()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
