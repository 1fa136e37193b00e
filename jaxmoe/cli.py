"""Command line: `jaxmoe generate`, `jaxmoe serve`, `jaxmoe demo`, `jaxmoe synth`, `jaxmoe convert`,
`jaxmoe cache` (the weights cache: list, verify, rm).

User errors (a bad path, a prompt too long, an invalid sampling parameter) print one line
`jaxmoe: error: ...` on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


class UserError(Exception):
    """An error caused by the command's input; reported without a traceback."""


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    _add_runtime(p)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of norms, embeddings, activations and the KV cache")
    p.add_argument("--cpu-kernels", choices=["auto", "on", "off"], default="auto",
                   help="run large matmuls and routed experts on jaxmoe's CPU kernels (auto: when JAX runs on the CPU)")
    p.add_argument("--cpu-precision", choices=["exact", "bf16"], default=None,
                   help="the CPU kernels' FP8/BF16 arithmetic: exact (f32 activations and sums, every CPU) or bf16 "
                        "(bf16 activations and dot products where the CPU has AVX-512 BF16); default: the runtime "
                        "preset's, else $JAXMOE_CPU_PRECISION, else exact")
    p.add_argument("--weights-cache", default=None, metavar="on|off|DIR",
                   help="keep the CPU kernels' packed weights between loads (jaxmoe cache): on (under the user cache "
                        "dir), off, or a directory; default: $JAXMOE_WEIGHTS_CACHE, else jaxmoe's default")
    p.add_argument("--tpot-target-ms", type=float, default=None, metavar="MS",
                   help="cpu-only: while requests decode, size prompt chunks so that a step is predicted to take at "
                        "most MS ms (decoders' time per output token); default: off")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not share the KV cache blocks of common prompt prefixes between requests (shared by default)")
    p.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                   help="also keep the prefix cache's blocks on disk in DIR, so a restart starts from the prefixes "
                        "computed before (fingerprinted by checkpoint, config and cache layout; default: memory only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmoe",
                                     description="MoE inference on JAX/XLA (DeepSeek-V3, Kimi-K2, Qwen3-MoE, GLM-4.5)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--chat", metavar="TEXT", help="a user message, rendered with the chat template")
    src.add_argument("--prompt-ids", metavar="IDS", help="comma-separated prompt token ids")
    _add_sampling(g, 64)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--max-seq-len", type=int, default=None, help="cap the context length")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    v.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors + tokenizer files)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=os.environ.get("JAXMOE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint but /health (default: $JAXMOE_API_KEY)")
    v.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's name)")
    v.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait for a cache slot; beyond that the server answers 503 (default 32)")
    v.add_argument("--n-slots", type=int, default=None, help="requests generated together (cache slots; default: the preset's)")
    v.add_argument("--max-seq-len", type=int, default=None, help="cap the context length (prompt + completion)")
    v.add_argument("--shutdown-timeout", type=int, default=30,
                   help="on SIGTERM, seconds to let requests in flight finish before cancelling them")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_runtime(v)

    d = sub.add_parser("demo", help="write a synthetic checkpoint (once, cached) and generate from it")
    d.add_argument("--config", default="demo", help="a config of jaxmoe/configs/models (default: demo)")
    d.add_argument("--fmt", choices=["fp8", "bf16", "f32"], default="fp8", help="weight format on disk")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--cache-dir", default=None, help="where the checkpoint is kept (default $JAXMOE_CACHE_DIR or .cache)")
    _add_sampling(d, 32)

    s = sub.add_parser("synth", help="write a synthetic random-weight checkpoint")
    s.add_argument("--config", required=True, help="a config name of jaxmoe/configs/models, or a config.json path")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--fmt", choices=["fp8", "bf16", "f32"], default="fp8")
    s.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="convert a checkpoint's routed experts (e.g. to INT4)")
    c.add_argument("--to", required=True, choices=["int4"], help="target format of the routed experts")
    c.add_argument("src", help="source checkpoint directory (FP8 or bf16)")
    c.add_argument("dst", help="output directory (written atomically)")
    c.add_argument("--group", type=int, default=32, help="INT4 group size along K (multiple of 32, <= 256)")
    c.add_argument("--int4-scale", choices=["search", "signed", "absmax"], default="search",
                   help="INT4 group scale rule: search = least squared error (default), signed = the extreme -> -8, "
                        "absmax = amax/7 (the first rule); recorded in jaxmoe_int4.json")
    c.add_argument("--workers", type=int, default=None, help="conversion threads (default: the usable CPUs, at most 16)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    w = sub.add_parser("cache", help="the weights cache: list, verify or remove packed-weight caches")
    w.add_argument("action", choices=["list", "verify", "rm"])
    w.add_argument("key", nargs="?", default=None, help="a cache key (see `jaxmoe cache list`)")
    w.add_argument("--all", action="store_true", help="verify / rm: every cache")
    w.add_argument("--dir", default=None, help="the cache root (default: $JAXMOE_CACHE_DIR/weights or ~/.cache/jaxmoe/weights)")
    return parser


# ---- helpers ----------------------------------------------------------------------------------
def _config(name: str):
    """A packaged config name or a config.json path, parsed by its model family (jaxmoe.models.registry)."""
    from jaxmoe.models.registry import read_config

    return read_config(name)


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _load(path: Path, a: argparse.Namespace, max_seq_len: int | None = None, **runtime_options):
    import jaxmoe

    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} does not exist")
    kernels = {"auto": None, "on": True, "off": False}[a.cpu_kernels]
    wc = getattr(a, "weights_cache", None)
    wc = {"on": True, "off": False}.get(wc, wc)
    try:
        return jaxmoe.load(path, dtype=_dtype(a.dtype), max_seq_len=max_seq_len, cpu_kernels=kernels,
                           cpu_precision=a.cpu_precision, weights_cache=wc,
                           tpot_target_ms=getattr(a, "tpot_target_ms", None),
                           prefix_caching=False if getattr(a, "no_prefix_cache", False) else None,
                           prefix_cache_dir=getattr(a, "prefix_cache_dir", None), **runtime_options)
    except RuntimeError as e:
        if kernels:  # --cpu-kernels on, where they cannot be built or loaded
            raise UserError(str(e)) from None
        raise


def _print_timings(t, out=None) -> None:
    print(
        f"prompt tokens {t.prompt_tokens}, generated tokens {t.generated_tokens}\n"
        f"time to first token  {t.ttft_s * 1000:9.1f} ms\n"
        f"prefill              {t.prefill_tok_s:9.1f} tok/s\n"
        f"decode               {t.decode_tok_s:9.1f} tok/s",
        file=out or sys.stdout,
    )


def _write_synthetic(out: Path, cfg, fmt: str, seed: int = 0) -> None:
    """The writer goes through a temporary sibling directory and renames it into place, so
    an interrupted write never leaves a half-written checkpoint behind."""
    from jaxmoe.models.registry import family_of

    family_of(cfg).write_synthetic(out, cfg, fmt=fmt, seed=seed, with_tokenizer=True)


# ---- commands ---------------------------------------------------------------------------------
def cmd_generate(a: argparse.Namespace) -> int:
    import jaxmoe

    model = _load(Path(a.model), a, a.max_seq_len)
    kwargs = _sampling_kwargs(a) | {"stop": a.stop}
    if a.chat is not None:
        kwargs["messages"] = [{"role": "user", "content": a.chat}]
        prompt = None
    elif a.prompt_ids is not None:
        try:
            prompt = [int(t) for t in a.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {a.prompt_ids!r}") from None
    else:
        prompt = a.prompt
    if a.stream:
        last = None
        for last in jaxmoe.stream_generate(model, prompt, **kwargs):
            print(last.text, end="", flush=True)
        print()
        print(f"[finish: {last.finish_reason}]", file=sys.stderr)
        _print_timings(last.timings, sys.stderr)
        return 0
    r = jaxmoe.generate(model, prompt, **kwargs)
    if a.json:
        print(json.dumps({
            "text": r.text, "token_ids": r.token_ids, "prompt_token_ids": r.prompt_token_ids,
            "finish_reason": r.finish_reason, "timings": vars(r.timings),
        }))
    else:
        print(r.text)
        print(f"[finish: {r.finish_reason}]", file=sys.stderr)
        _print_timings(r.timings, sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {a.max_queue}")
    if a.n_slots is not None and a.n_slots < 1:
        raise UserError(f"--n-slots must be >= 1, got {a.n_slots}")
    from jaxmoe.server.serve import serve

    path = Path(a.model)
    options = {} if a.n_slots is None else {"n_slots": a.n_slots}
    model = _load(path, a, a.max_seq_len, **options)
    name = a.served_model_name or path.resolve().name
    print(f"jaxmoe serve: {name!r} from {path} ({model.engine.n_slots} slots, context {model.context_len} tokens) "
          f"on http://{a.host}:{a.port}/v1" + (" (API key required)" if a.api_key else ""), file=sys.stderr, flush=True)
    serve(model, host=a.host, port=a.port, served_model_name=name, api_key=a.api_key or None, max_queue=a.max_queue,
          shutdown_timeout=a.shutdown_timeout, log_level=a.log_level)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import jaxmoe

    cfg = _config(a.config)
    digest = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(a.cache_dir or os.environ.get("JAXMOE_CACHE_DIR") or ".cache")
    ckpt = root / f"demo-{a.config}-{a.fmt}-{digest}"
    print(f"jaxmoe {jaxmoe.__version__} demo: config {a.config!r} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok}, "
          f"vocab {cfg.vocab_size}), {a.fmt} weights")
    if not (ckpt / "config.json").is_file():
        print(f"writing synthetic checkpoint to {ckpt} ...", flush=True)
        t0 = time.perf_counter()
        _write_synthetic(ckpt, cfg, a.fmt)
        print(f"  written in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"using cached synthetic checkpoint {ckpt}")
    t0 = time.perf_counter()
    model = _load(ckpt, a)
    where = "large matmuls and routed experts on jaxmoe's CPU kernels" if model.cpu_kernels else "pure JAX path"
    print(f"loaded in {time.perf_counter() - t0:.1f} s; running on {model_device()}, {where}")
    kwargs = _sampling_kwargs(a)
    n_prompt = len(model.encode_prompt(a.prompt))
    model.check_fits(n_prompt, a.max_new_tokens)
    print(f"compiled in {model.compile(n_prompt, a.max_new_tokens):.1f} s (step programs for this kv window)")
    print(f"\nprompt: {a.prompt!r}\n--- generated (random weights: expect gibberish) ---")
    last = None
    for last in jaxmoe.stream_generate(model, a.prompt, **kwargs):
        print(last.text, end="", flush=True)
    print(f"\n--- finish: {last.finish_reason} ---")
    _print_timings(last.timings)
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    cfg = _config(a.config)
    out = Path(a.out)
    if out.exists():
        raise UserError(f"output directory {out} already exists")
    t0 = time.perf_counter()
    _write_synthetic(out, cfg, a.fmt, a.seed)
    print(f"wrote {a.fmt} checkpoint of {a.config!r} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from jaxmoe.loading.convert import convert_int4
    from jaxmoe.models import registry

    src = Path(a.src)
    if not src.is_dir():
        raise UserError(f"checkpoint directory {src} does not exist")
    t0 = time.perf_counter()
    family = registry.family_of(registry.read_config_dict(src)[0])
    out = convert_int4(src, a.dst, group=a.group, scale_rule=a.int4_scale, overwrite=a.overwrite, progress=True,
                       workers=a.workers, open_checkpoint=family.open_checkpoint)
    print(f"wrote {out}: routed experts INT4 (group {a.group}, {a.int4_scale} scales), other weights as in {src}, "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from jaxmoe.cpu import weights_cache_format as wc

    root = Path(a.dir).expanduser() if a.dir else wc.default_root()
    if a.action == "list":
        if a.key or a.all:
            raise UserError("`jaxmoe cache list` takes no key")
        rows = wc.list_caches(root)
        for r in rows:
            what = r.get("checkpoint") or ", ".join(r.get("files", [])) if r["ok"] else f"UNUSABLE: {r['error']}"
            print(f"{r['key']}  {wc.human_bytes(r['bytes']):>12}  {what}")
        print(f"{len(rows)} cache(s), {wc.human_bytes(sum(r['bytes'] for r in rows))} in {root}", file=sys.stderr)
        return 0
    if bool(a.key) == a.all:
        raise UserError(f"`jaxmoe cache {a.action}` takes a KEY or --all")
    keys = [r["key"] for r in wc.list_caches(root)] if a.all else [a.key]
    if a.key and not (root / a.key).is_dir():
        raise UserError(f"no cache {a.key!r} in {root}")
    bad = 0
    for key in keys:
        if a.action == "rm":
            wc.remove_cache(key, root)
            print(f"removed {key}")
            continue
        try:
            wc.verify_dir(root / key, "full", key)
            print(f"{key}  ok")
        except wc.CacheError as e:
            bad += 1
            print(f"{key}  BAD: {e}")
    return 1 if bad else 0


def model_device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind})"


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "demo": cmd_demo, "synth": cmd_synth, "convert": cmd_convert,
            "cache": cmd_cache}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.version:
        from jaxmoe import __version__

        print(f"jaxmoe {__version__}")
        return 0
    if a.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[a.command](a)
    except (UserError, ValueError, OSError) as e:  # ConfigError, TokenizerError, CheckpointError are ValueErrors
        print(f"jaxmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
