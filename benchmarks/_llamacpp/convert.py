"""Our synthetic checkpoint -> GGUF with the sdist's convert_hf_to_gguf.py.

The traps (DESIGN.md section 4) and how they are met:
- routing: the converter reads `scoring_func` from config.json and silently routes with
  softmax without it; DeepSeek-V3 routes with a sigmoid, so a missing value is set to it;
- layer counts 26 and 27 are read as the "lite" DeepSeek variant: refused with a clear error;
- the pre-tokenizer: the converter knows tokenizers by the hash of a probe text's ids; ours
  (a byte-level BPE trained with `tokenizers`, GPT-2 style) is unknown to it, so the entry
  script (`_convert_entry.py`) maps an unrecognised one to "gpt-2";
- the FP8 weights with `weight_scale_inv`: the converter dequantizes them itself
  (quantization_config.quant_method == "fp8"), kept as is.
Qwen3-MoE checkpoints (`qwen3moe` in llama.cpp) need none of the config fixes.

The checkpoint is staged in the cache (symlinks to its safetensors, a fixed config.json),
never modified in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

OUTTYPES = ("q8_0", "bf16")
DEEPSEEK = ("deepseek_v3", "deepseek_v2")  # model_types whose config needs the fixes below
AS_IS = ("qwen3_moe",)  # converted as they are (softmax routing is the converter's default and Qwen3-MoE's own)
LITE_LAYER_COUNTS = (26, 27)
ENTRY = Path(__file__).with_name("_convert_entry.py")
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def fix_config(cfg: dict) -> tuple[dict, list[str]]:
    """config.json as llama.cpp's converter must see it, and what was changed (in words)."""
    cfg = dict(cfg)
    notes = []
    if cfg.get("model_type") not in (*DEEPSEEK, *AS_IS):
        raise ValueError(f"config.json: model_type {cfg.get('model_type')!r} is not one the peer converts "
                         f"({', '.join((*DEEPSEEK, *AS_IS))})")
    if cfg["model_type"] in AS_IS:
        return cfg, notes
    if "scoring_func" not in cfg:
        cfg["scoring_func"] = "sigmoid"
        notes.append("scoring_func: missing -> 'sigmoid' (DeepSeek-V3 routing; the converter would use softmax)")
    elif cfg["scoring_func"] != "sigmoid":
        notes.append(f"scoring_func: {cfg['scoring_func']!r} kept (not DeepSeek-V3's sigmoid)")
    n = cfg.get("num_hidden_layers")
    if n in LITE_LAYER_COUNTS:
        raise ValueError(f"config.json: num_hidden_layers={n} is read by llama.cpp as DeepSeek-V2-Lite; "
                         f"use another layer count for the peer benchmark")
    if cfg.get("num_nextn_predict_layers"):
        notes.append(f"num_nextn_predict_layers: {cfg['num_nextn_predict_layers']} (the converter skips MTP layers)")
    # the spelling transformers 5.x writes: the converter reads rope_scaling / rope_theta
    if "rope_parameters" in cfg and "rope_scaling" not in cfg:
        rp = dict(cfg["rope_parameters"])
        if "rope_theta" in rp and "rope_theta" not in cfg:
            cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", rp.get("type")) not in (None, "default"):
            rp.setdefault("type", rp.get("rope_type"))
            cfg["rope_scaling"] = rp
        notes.append("rope_parameters -> rope_scaling/rope_theta")
    return cfg, notes


def stage(checkpoint: Path, dest: Path) -> tuple[Path, list[str]]:
    """A directory the converter reads: symlinks to the checkpoint's weights and tokenizer,
    and a fixed config.json. Returns (dest, notes)."""
    checkpoint = Path(checkpoint)
    cfg_path = checkpoint / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint {checkpoint}")
    if not (checkpoint / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in checkpoint {checkpoint} (the converter needs the tokenizer)")
    cfg, notes = fix_config(json.loads(cfg_path.read_text()))
    dest.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            link = dest / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f.resolve())
    for name in COPIED:
        if (checkpoint / name).is_file():
            (dest / name).write_bytes((checkpoint / name).read_bytes())
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dest, notes


def convert_cmd(llama_dir: Path, staged: Path, outfile: Path, outtype: str, python: str = sys.executable) -> list[str]:
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r}: expected one of {OUTTYPES}")
    return [python, str(ENTRY), str(llama_dir), str(staged), "--outfile", str(outfile), "--outtype", outtype]


def convert_env(llama_dir: Path) -> dict:
    """The converter's own gguf-py first on the path (the one it was written against)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(llama_dir) / "gguf-py"), str(llama_dir)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def fingerprint(checkpoint: Path) -> str:
    """A short digest of the checkpoint (config.json, and the names and sizes of its files):
    a GGUF converted from other weights under the same model name is never reused."""
    checkpoint = Path(checkpoint)
    h = hashlib.sha256((checkpoint / "config.json").read_bytes())
    for f in sorted(checkpoint.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:10]


def gguf_path(cache: Path, model: str, outtype: str, checkpoint: Path | None = None) -> Path:
    tag = f"-{fingerprint(checkpoint)}" if checkpoint is not None else ""
    return cache / "gguf" / f"{model}{tag}-{outtype}.gguf"


def ensure_gguf(cache: Path, llama_dir: Path | None, checkpoint: Path, model: str, outtype: str) -> tuple[Path, list[str]]:
    """The GGUF of `checkpoint` in `outtype`, converted once (written to a temporary name
    first, so an interrupted conversion is never taken for a finished one)."""
    out = gguf_path(cache, model, outtype, checkpoint)
    if out.is_file():
        return out, [f"reused {out}"]
    if llama_dir is None:
        raise FileNotFoundError(f"no GGUF {out} and no llama.cpp source tree to convert with")
    staged, notes = stage(checkpoint, cache / "staged" / model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    log = cache / f"convert-{model}-{outtype}.log"
    with log.open("w") as f:
        r = subprocess.run(convert_cmd(llama_dir, staged, tmp, outtype), stdout=f, stderr=subprocess.STDOUT,
                           env=convert_env(llama_dir), check=False)
    if r.returncode or not tmp.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py ({outtype}) failed with exit {r.returncode}; see {log}")
    tmp.rename(out)
    return out, notes
