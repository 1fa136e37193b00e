"""A loaded checkpoint and how it is loaded: `load` -> `Model`.

`load` finds the checkpoint's model family (`models.registry`), reads it (`loading`; other
families through their own loader and checkpoint class), decides where each part lives from the runtime
preset (the CPU kernels' placement: `cpu.placement`, the optional persistent weights cache:
`cpu.weights_cache`), and returns a `Model`: config, weights, tokenizer, runtime, and its
serving engine, created on first use. Generation over a `Model` is `generate.py`'s.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.loading.expert_source import CheckpointExperts
from jaxmoe.loading.loader import load_checkpoint, open_checkpoint
from jaxmoe.model.weights import split_experts
from jaxmoe.models.registry import DEEPSEEK_V3, ModelFamily, family_of, read_config_dict
from jaxmoe.planning.strategies import PrefillStrategy
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.presets import RuntimeConfig
from jaxmoe.serving.prompt_runner import host_expert_source
from jaxmoe.tokenizer import Message, Tokenizer, Tool

DEFAULT_MAX_SEQ_LEN = 4096  # context per request unless max_seq_len says otherwise (cache memory)
# load(weights_cache=None) without $JAXMOE_WEIGHTS_CACHE: on, at the default root. Written in
# the background after the load that packs (so it never slows that load), mapped by the loads
# after it. The mapped slabs decode as fast as the packed store's in one process, alternated
# (bench-v3-mid, 2 AVX2 cores: docs/PERFORMANCE_MODEL.md, "The price of mapping").
DEFAULT_WEIGHTS_CACHE: bool = True


# ---- the loaded model -------------------------------------------------------------------------
@dataclass(eq=False)
class Model:
    """A loaded checkpoint: config (of its family, `models.registry`), weights pytree, tokenizer
    (None without tokenizer.json)."""

    cfg: ModelConfig | Any = field(repr=False)
    weights: Any = field(repr=False)
    tokenizer: Tokenizer | None = field(default=None, repr=False)
    max_seq_len: int | None = None  # a cap on the context below max_position_embeddings
    path: Path | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    cpu_kernels: bool = False  # large matmuls and/or routed experts run on cpu_ext
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    prefix_cache_dir: Path | None = None  # the prefix cache's blocks on disk too (Engine's prefix_cache_dir)
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _cache_write: Any = field(default=None, init=False, repr=False)  # cpu.weights_cache.BackgroundWrite
    _cache_read: Any = field(default=None, init=False, repr=False)  # loading.readahead.ReadAhead of a mapped cache
    _checkpoint: Any = field(default=None, init=False, repr=False)

    @property
    def engine(self) -> Engine:
        """The serving engine of this model (created on first use). With accelerators, its
        stream-loading prefill reads the routed experts from the host copy decode reads."""
        if self._engine is None:
            self._engine = Engine(self.cfg, self.weights, self.runtime, max_len=self.context_len,
                                  expert_source=self._expert_source(), prefix_cache_dir=self.prefix_cache_dir,
                                  weights_identity=self.weights_identity() if self.prefix_cache_dir else None)
        return self._engine

    def weights_identity(self) -> str:
        """What names these weights for the prefix store: the checkpoint's files (names, sizes,
        mtimes, safetensors header hashes), where they run and the kernels' precision."""
        if self.path is None:
            raise ValueError("a prefix cache directory needs a model loaded from a checkpoint directory")
        from jaxmoe.cpu.weights_cache import checkpoint_identity  # noqa: PLC0415  (no native code)

        return json.dumps({"checkpoint": checkpoint_identity(self.path), "cpu_kernels": self.cpu_kernels,
                           "cpu_precision": self.runtime.cpu_precision or os.environ.get("JAXMOE_CPU_PRECISION", "exact")},
                          sort_keys=True)

    def _expert_source(self) -> Any:
        """None when the engine streams from the weights' own host copy (the expert store's
        slabs that decode reads, or host arrays); else the checkpoint's mmap (e.g. INT4 stores)."""
        if self.path is None or not self.runtime.accelerators or self.runtime.prefill_strategy == PrefillStrategy.CPU:
            return None
        if "streamed_prefill" not in family_of(self.cfg).supports:  # the engine says why, if asked to stream
            return None
        if host_expert_source(split_experts(self.weights)[1]) is not None:
            return None
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.path)
        return CheckpointExperts(self._checkpoint)

    def close(self) -> None:
        """Free the native memory of CPU-kernel weights now (rather than at exit); a weights cache
        still being written from them is cancelled first (none is left half-written), and the
        reading of a mapped cache stopped."""
        if self._cache_read is not None:
            self._cache_read.close()
            self._cache_read = None
        if self._cache_write is not None:
            self._cache_write.stop()
            self._cache_write = None
        self._engine = None
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None
        if self.cpu_kernels:
            from jaxmoe.cpu.placement import release  # noqa: PLC0415  (cffi only where the kernels ran)

            release(self.weights)
            self.cpu_kernels, self.weights = False, None

    @property
    def dtype(self) -> jnp.dtype:
        """Activation and KV-cache dtype (that of the embeddings)."""
        return self.weights.embed_tokens.dtype

    @property
    def context_len(self) -> int:
        """Most positions one request may use (prompt + generated tokens): max_seq_len
        (default DEFAULT_MAX_SEQ_LEN) capped by max_position_embeddings."""
        return min(self.cfg.max_position_embeddings, self.max_seq_len or DEFAULT_MAX_SEQ_LEN)

    def compile(self, prompt_tokens: int, max_new_tokens: int = 2) -> float:
        """Warm the engine's step programs with a throwaway request of this prompt length
        (seconds taken); requests of similar sizes then start without compiling."""
        t0 = time.perf_counter()
        self.check_fits(prompt_tokens, max_new_tokens)
        req = self.engine.submit([0] * prompt_tokens, min(max_new_tokens, 2))
        for _ in req.events():
            pass
        return time.perf_counter() - t0

    def encode_prompt(
        self,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> list[int]:
        """Token ids of a text prompt, a token-id prompt or chat `messages` (with OpenAI-style
        `tools` rendered by the chat template), validated."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of `prompt` (text or token ids) or `messages`")
        if tools is not None and messages is None:
            raise ValueError("`tools` go with `messages` (the chat template renders them), not with a prompt")
        if messages is not None:
            ids = self._require_tokenizer("messages").encode_chat(messages, tools=tools)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self._require_tokenizer("a text prompt").encode(prompt)
        else:
            ids = _token_ids(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        vocab = self.cfg.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t} at index {i} is outside the vocabulary [0, {vocab})")
        return ids

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and {self.path} has no tokenizer.json; pass token ids")
        return self.tokenizer

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        total, limit = prompt_tokens + max_new_tokens, self.context_len
        if total > limit:
            why = f"max_position_embeddings={self.cfg.max_position_embeddings})"
            if limit < self.cfg.max_position_embeddings:
                why = f"max_seq_len={limit}); load() with a larger max_seq_len for more"
            raise ValueError(
                f"prompt too long: {prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} = "
                f"{total} tokens exceeds the model's context of {limit} tokens ({why}"
            )


def load(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    max_seq_len: int | None = None,
    cpu_kernels: bool | None = None,
    cpu_precision: str | None = None,
    progress: Any = None,
    runtime: str | None = None,
    weights_cache: bool | str | Path | None = None,
    prefix_cache_dir: str | Path | None = None,
    **runtime_options: Any,
) -> Model:
    """Load a checkpoint directory (config.json, safetensors, optional tokenizer files).

    dtype: the dtype of norms, embeddings, activations and the KV cache (Linears keep their
      stored format: FP8 stays FP8).
    max_seq_len: cap the context (prompt + generated tokens) below max_position_embeddings.
    cpu_kernels: run the large matmuls and the routed experts through jaxmoe's native CPU
      kernels (cpu_ext). None (default) = when JAX runs on the CPU and the kernels load;
      True = required; False = the pure JAX path. Every family whose `models.registry` entry
      supports "cpu_kernels" (DeepSeek-V3, Qwen3-MoE, GLM-4.5; chosen by config.json's
      model_type / architectures); for a family without it True raises ValueError.
    cpu_precision: arithmetic of those kernels' FP8/BF16 matmuls: "exact" (weights decoded
      exactly, f32 activations and sums, on every CPU) or "bf16" (activations rounded to bf16
      and bf16 dot products where the CPU has them, AVX-512 BF16: ~2e-3 relative error per
      output; elsewhere exact). None (default) = the runtime preset's `cpu_precision`, else
      the library's setting (env JAXMOE_CPU_PRECISION, else exact). Process-wide: it applies
      to every model of the process that runs on the kernels. Ignored without the kernels.
    progress: show a progress bar with GiB/s and the time left (None = on a terminal once the
      load passes 1 s; elsewhere a line every 10 s of a long load).
    runtime: a runtime preset of jaxmoe/configs/runtime/ (default: "cpu-only" without a GPU,
      "gpu+cpu-experts" with one, "2gpu+cpu-experts" with two); runtime_options override
      its fields (n_slots, chunk_size, overlap, memory_budget_bytes, prefill_strategy
      ("auto" | "cpu" | "slp" | "dslp"), hardware, ...).
    weights_cache: where the CPU kernels' packed weights are kept between loads
      (jaxmoe.cpu.weights_cache: written once, then mapped instead of repacked): a directory,
      True (the default root, jaxmoe.config.cache_dir() / "weights"), False (off). None
      (default): $JAXMOE_WEIGHTS_CACHE ("0"/"off" disables, "1"/"on" or a path enables), else
      DEFAULT_WEIGHTS_CACHE. Only where the routed experts go to the kernels.
    prefix_cache_dir: also keep the prefix cache's full KV blocks on disk in this directory
      (written atomically, fingerprinted by checkpoint, config, cache dtype and block size,
      bounded in bytes), so a later load starts from the prefixes computed before. The
      in-memory prefix cache is on by default (`prefix_caching=False` turns it off).
    """
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    rc = RuntimeConfig.load(runtime or _default_preset(), cpu_precision=cpu_precision, **runtime_options)
    path = Path(path)
    family = _family(path)
    if "cpu_kernels" not in family.supports:  # the pure JAX path
        if cpu_kernels:
            raise ValueError(f"cpu_kernels=True: jaxmoe's CPU kernels do not run {family.name} models yet "
                             f"(pass cpu_kernels=False or None: the pure JAX path)")
        cfg, weights = family.load_checkpoint(path, dtype=dtype)
        return _model(path, cfg, weights, max_seq_len, False, rc, prefix_cache_dir)
    host_experts = _experts_to_host(cpu_kernels, rc)
    root = _weights_cache_root(weights_cache) if host_experts and (path / "config.json").is_file() else None
    if root is not None:
        from jaxmoe.cpu import weights_cache as wc  # noqa: PLC0415

        load_rest = None  # a cache hit reads the rest with DeepSeek-V3's loader; another family's with its own
        if family is not DEEPSEEK_V3:
            load_rest = lambda: family.load_checkpoint(path, dtype=dtype, load_experts=False)  # noqa: E731
        cfg, weights, writing, reading = wc.load_placed(
            path, root=root, dtype=dtype, progress=progress, experts_only=rc.staged,
            load=lambda: _load_weights(path, dtype, progress, True, host_linears=not rc.staged, family=family),
            place=lambda c, w, s: _place(c, w, cpu_kernels, rc, s)[0], load_rest=load_rest,
            background=weights_cache is None)
        model = _model(path, cfg, weights, max_seq_len, True, rc, prefix_cache_dir)
        model._cache_write, model._cache_read = writing, reading
        return model
    cfg, weights, store = _load_weights(path, dtype, progress, host_experts,
                                        host_linears=host_experts and not rc.staged, family=family)
    weights, on_kernels = _place(cfg, weights, cpu_kernels, rc, store)
    return _model(path, cfg, weights, max_seq_len, on_kernels, rc, prefix_cache_dir)


def _family(path: Path) -> ModelFamily:
    """The model family of the checkpoint at `path` (its config.json's model_type / architectures;
    ConfigError for an unsupported one). A missing or unreadable config.json: DeepSeek-V3's
    loader reports it."""
    try:
        d, _ = read_config_dict(path)
    except ConfigError:
        return DEEPSEEK_V3
    return family_of(d)


def _model(path: Path, cfg: Any, weights: Any, max_seq_len: int | None, on_kernels: bool, rc: RuntimeConfig,
           prefix_cache_dir: str | Path | None) -> Model:
    """The Model, with the tokenizer files of `path` (if any) and the EOS ids of config and tokenizer."""
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    eos = set(cfg.eos_token_id)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return Model(cfg, weights, tokenizer, max_seq_len, path, frozenset(eos), on_kernels, rc,
                 None if prefix_cache_dir is None else Path(prefix_cache_dir).expanduser())


def _default_preset() -> str:
    n_gpus = len(jax.devices()) if jax.default_backend() == "gpu" else 0
    return {0: "cpu-only", 1: "gpu+cpu-experts"}.get(n_gpus, "2gpu+cpu-experts")


def _weights_cache_root(weights_cache: bool | str | Path | None) -> Path | None:
    """The weights cache's root for load(weights_cache=...), None when off."""
    if weights_cache is None:
        env = os.environ.get("JAXMOE_WEIGHTS_CACHE", "").strip()
        if env.lower() in ("0", "off", "false", "no"):
            weights_cache = False
        elif env.lower() in ("1", "on", "true", "yes"):
            weights_cache = True
        else:
            weights_cache = env or DEFAULT_WEIGHTS_CACHE
    if weights_cache is False:
        return None
    if weights_cache is True:
        from jaxmoe.cpu.weights_cache import default_root  # noqa: PLC0415

        return default_root()
    return Path(weights_cache).expanduser()


def _experts_to_host(cpu_kernels: bool | None, rc: RuntimeConfig) -> bool:
    """Whether `_place` puts the routed experts in a host ExpertStore and the kernels load here."""
    if cpu_kernels is False or rc.routed_experts == "accelerator":
        return False
    if cpu_kernels is None and not rc.staged and jax.default_backend() != "cpu":
        return False
    try:
        from jaxmoe.cpu import _lib  # noqa: PLC0415

        _lib.load()
        return True
    except (ImportError, OSError, RuntimeError):  # _place says why (or falls back)
        return False


def _load_weights(path: Path, dtype: Any, progress: Any, host_experts: bool,
                  host_linears: bool = False, family: ModelFamily = DEEPSEEK_V3) -> tuple[ModelConfig, Any, Any]:
    """(cfg, weights, ExpertStore or None). With host_experts the routed experts are packed
    straight from the checkpoint's mapping into the store (on the native thread pool, reading
    ahead: ExpertStore.from_checkpoint, from the family's checkpoint class), not stacked into
    arrays first; one progress bar. host_linears (DeepSeek-V3): the other Linears stay views of
    the files too, for _place to pack them for the kernels from there (what stays with XLA it
    puts on the device); another family's loader reads them into arrays, which _place packs."""
    deepseek = family is DEEPSEEK_V3
    if not host_experts:
        if deepseek:
            return (*load_checkpoint(path, dtype=dtype, progress=progress), None)
        return (*family.load_checkpoint(path, dtype=dtype), None)
    from jaxmoe.cpu.expert_store import ExpertStore  # noqa: PLC0415
    from jaxmoe.loading.progress import Progress  # noqa: PLC0415

    with (open_checkpoint(path) if deepseek else family.open_checkpoint(path)) as ck:
        bar = Progress(*ck.load_size(), enabled=progress, label=f"loading {path.name}")
        try:
            # one reading thread, in the order the load consumes: the experts (paced by their
            # packing), then every other tensor (it goes on while load_checkpoint and _place read
            # them from the mapping, and ends by itself)
            store = ExpertStore.from_checkpoint(ck, progress=bar, read_after=ck.resident_arrays())
            try:
                if deepseek:
                    cfg, weights = load_checkpoint(ck, dtype=dtype, progress=bar, load_experts=False,
                                                   host_linears=host_linears)
                else:
                    cfg, weights = family.load_checkpoint(ck, dtype=dtype, load_experts=False)
                    bar.update(*ck.load_size(load_experts=False))
            except BaseException:
                store.free()
                raise
        finally:
            bar.close()
    return cfg, weights, store


def _place(cfg: ModelConfig, weights: Any, cpu_kernels: bool | None, rc: RuntimeConfig,
           store: Any = None) -> tuple[Any, bool]:
    """(weights, whether cpu_ext runs some of them). cpu-only: every large matmul on the CPU
    kernels; staged presets: only the routed experts (the rest goes to the accelerators);
    routed experts on the accelerator: none. store: the ExpertStore holding the routed experts
    when the weights were loaded without them (_load_weights)."""
    if cpu_kernels is False or rc.routed_experts == "accelerator":
        return weights, False
    if cpu_kernels is None and not rc.staged and jax.default_backend() != "cpu":
        return weights, False
    try:
        from jaxmoe.cpu import _lib, placement  # noqa: PLC0415  (cffi and the native build only when used)

        if rc.cpu_precision is not None:  # process-wide, before any kernel runs
            _lib.load().set_precision(rc.cpu_precision)
        experts_only = {"min_elements": 1 << 62} if rc.staged else {}
        placed = placement.to_cpu_placement(weights, cfg=cfg, store=store, **experts_only)
        return _device_leaves(placed), True
    except (ImportError, OSError, RuntimeError) as e:  # the native library cannot be built or loaded here
        if cpu_kernels or store is not None:
            raise RuntimeError(f"cpu_kernels=True, but jaxmoe's CPU kernels are unavailable: {e}") from e
        warnings.warn(f"jaxmoe's CPU kernels are unavailable ({e}); running the pure JAX path", stacklevel=3)
        return weights, False


def _device_leaves(weights: Any) -> Any:
    """numpy leaves (views of the files left by load_checkpoint(host_linears=True) that stay
    with XLA, e.g. float32 Linears or FP8 scales) as device arrays."""
    from jaxmoe.loading.loader import host_copy  # noqa: PLC0415

    return jax.tree_util.tree_map(lambda x: jax.device_put(host_copy(x)) if isinstance(x, np.ndarray) else x, weights)


def _token_ids(prompt: Any) -> list[int]:
    arr = np.asarray(prompt)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt must be a string or a 1-D sequence of integer token ids, got {type(prompt).__name__}")
    return [int(t) for t in arr]
