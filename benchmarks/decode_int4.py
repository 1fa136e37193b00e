"""End-to-end decode with INT4 routed experts vs FP8: batch-1 tok/s on the cpu-only engine.

    python -m benchmarks.decode_int4 [--quick] [--json PATH] [--config bench-v3-mid] [--rounds 3] [--new-tokens 16]

The synthetic FP8 checkpoint of benchmarks/e2e.py (cached) and its INT4 conversion (group 32,
the default scale rule, `jaxmoe convert`, cached beside it as <name>-int4-g32-<rule>) are both
loaded (one request slot each). Each round runs one greedy request of `--new-tokens` tokens on
the FP8 model, then on the INT4 model, and a read-only pass over the bytes one token reads in
each (the kernels' matrices, e2e.token_matrices, plus XLA's own f32 Linears), so host-load drift
hits both alike. Reported: median decode tok/s of each, the INT4/FP8 ratio, bytes per token, and
each one's fraction of its read-pass bound. Results: PATH, and
benchmarks/results/decode_int4.json for a full default run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as H
from benchmarks import e2e


def main(argv=None) -> dict:
    ap = H.parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="jaxmoe/configs/models name (default bench-v3-mid; tiny with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 3; 1 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per round (default 16; 4 with --quick)")
    args = ap.parse_args(argv)
    name = args.config or ("tiny" if args.quick else "bench-v3-mid")
    rounds, new = args.rounds or (1 if args.quick else 3), args.new_tokens or (4 if args.quick else 16)

    import jaxmoe  # noqa: PLC0415
    from jaxmoe.cpu._lib import load as load_native  # noqa: PLC0415
    from jaxmoe.loading.convert import convert_int4  # noqa: PLC0415
    from jaxmoe.quant_int4 import DEFAULT_SCALE_RULE  # noqa: PLC0415

    tmp = tempfile.TemporaryDirectory(prefix="jaxmoe-int4-") if args.quick and args.config is None else None
    root = Path(tmp.name) if tmp else e2e.cache_dir()
    fp8_path, _ = e2e.checkpoint(name, root)
    rule = DEFAULT_SCALE_RULE
    int4_path = root / f"{name}-int4-g32-{rule}"  # the scale rule in the key: no stale conversion reused
    if not (int4_path / "config.json").is_file():
        t0 = time.perf_counter()
        convert_int4(fp8_path, int4_path, group=32, scale_rule=rule)
        print(f"converted {fp8_path} -> {int4_path} in {time.perf_counter() - t0:.0f} s", flush=True)
    nat = load_native()
    models, reads, nbytes = {}, {}, {}
    for k, p in (("fp8", fp8_path), ("int4", int4_path)):
        models[k] = jaxmoe.load(p, runtime="cpu-only", cpu_kernels=True, n_slots=1)
        e2e.TOP_K[0] = models[k].cfg.num_experts_per_tok
        mats, _, xla_bytes = e2e.token_matrices(models[k].weights, nat)
        reads[k], nbytes[k] = e2e.read_fn(nat, mats), e2e.matrix_bytes(nat, mats) + xla_bytes
    prompt = list(range(5, 37))
    for m in models.values():  # compile outside the timings
        jaxmoe.generate(m, prompt, max_new_tokens=2)
    tok_s = {k: [] for k in models}
    read_s = {k: [] for k in models}
    for r in range(rounds):
        for k, m in models.items():
            tok_s[k].append(jaxmoe.generate(m, prompt, max_new_tokens=new).timings.decode_tok_s)
            read_s[k].append(H.timeit(reads[k], 1, warmup=0)["median"])
            print(f"round {r} {k:4s}: {tok_s[k][-1]:.3f} tok/s, read pass {nbytes[k] / read_s[k][-1] / 1e9:.1f} GB/s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    read_gbps = {k: nbytes[k] / statistics.median(v) / 1e9 for k, v in read_s.items()}
    frac = {k: med[k] * nbytes[k] / 1e9 / read_gbps[k] for k in models}
    metrics = {"decode_tok_s_fp8": round(med["fp8"], 3), "decode_tok_s_int4": round(med["int4"], 3),
               "int4_over_fp8": round(med["int4"] / med["fp8"], 3),
               "bytes_per_token_fp8": nbytes["fp8"], "bytes_per_token_int4": nbytes["int4"],
               "frac_of_read_bound_fp8": round(frac["fp8"], 3), "frac_of_read_bound_int4": round(frac["int4"], 3)}
    details = {"model": name, "rounds": rounds, "new_tokens": new, "tok_s": tok_s, "read_gbps": read_gbps,
               "checkpoints": {"fp8": str(fp8_path), "int4": str(int4_path)}}
    env = H.env_info(isa=nat.selected_isa(), threads=nat.lib.jm_num_threads(), quick=args.quick)
    doc = H.write(args.json, metrics, env, details)
    if not args.quick and args.config is None:
        H.write(H.default_result("decode_int4.json"), metrics, env, details)
    print(metrics)
    for m in models.values():
        m.close()
    if tmp:
        tmp.cleanup()
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
