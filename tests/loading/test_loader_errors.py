"""Bad checkpoints: each loader failure names the tensor and the file, and nothing survives it."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxmoe.loading import loader
from jaxmoe.loading.loader import CheckpointError, load_checkpoint, open_checkpoint
from jaxmoe.loading.synthetic import quantize_linears, write_checkpoint
from jaxmoe.quant import DenseWeight

L1 = "model.layers.1"
Q_A = f"{L1}.self_attn.q_a_proj.weight"
NORM = f"{L1}.input_layernorm.weight"


def write(tmp_path: Path, cfg, tensors, **kw) -> Path:
    return write_checkpoint(tmp_path / "ck", cfg, tensors, **kw)


def load_error(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert isinstance(e.value, ValueError)
    return e.value


def test_missing_config(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, tiny_f32)
    (path / "config.json").unlink()
    assert f"missing config: {path / 'config.json'}" in str(load_error(path))
    (path / "config.json").write_text("{")
    assert f"cannot read config {path / 'config.json'}" in str(load_error(path))


def test_missing_tensors_all_reported(tmp_path, tiny_cfg, tiny_f32):
    gone = [f"model.layers.2.mlp.experts.{e}.up_proj.weight" for e in range(8)]
    gone += [NORM, "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"]
    path = write(tmp_path, tiny_cfg, {k: v for k, v in tiny_f32.items() if k not in gone})
    err = load_error(path)
    assert sorted(p.split("'")[1] for p in err.problems) == sorted(gone)
    msg = str(err)
    assert "12 problem(s)" in msg and "missing (12)" in msg and "... and 2 more" in msg
    assert f"'{NORM}' (not in any file of {path})" in msg


def test_unexpected_tensors(tmp_path, tiny_cfg, tiny_f32):
    extra = {f"{L1}.mlp.experts.8.gate_proj.weight": np.zeros((32, 64), np.float32),  # only 8 experts
             "model.rotary_emb.inv_freq": np.zeros(4, np.float32),
             "model.layers.5.input_layernorm.weight": np.zeros(64, np.float32)}  # past the MTP layer
    path = write(tmp_path, tiny_cfg, {**tiny_f32, **extra})
    err = load_error(path)
    assert "unexpected (3)" in str(err)
    for name in extra:
        assert f"'{name}' in {path / 'model.safetensors'}" in str(err)


def test_wrong_shape_and_dtype(tmp_path, tiny_cfg, tiny_f32):
    tiny_f32[Q_A] = tiny_f32[Q_A].T.copy()
    tiny_f32[NORM] = tiny_f32[NORM].astype(np.int32)
    tiny_f32["model.norm.weight"] = tiny_f32["model.norm.weight"].astype(ml_dtypes.float8_e4m3fn)
    path = write(tmp_path, tiny_cfg, tiny_f32)
    msg = str(load_error(path))
    file = path / "model.safetensors"
    assert f"wrong shape (1):\n    '{Q_A}' in {file}: [64, 48], expected [48, 64]" in msg
    assert f"'{NORM}' in {file}: I32, expected one of ['BF16', 'F16', 'F32']" in msg
    assert f"'model.norm.weight' in {file}: F8_E4M3" in msg


def test_fp8_scale_problems_collected_across_kinds(tmp_path, tiny_cfg, tiny_f32):
    q = quantize_linears(tiny_f32, tiny_cfg)
    kv_b = f"{L1}.self_attn.kv_b_proj.weight_scale_inv"
    del q[f"{L1}.self_attn.o_proj.weight_scale_inv"]
    q[kv_b] = np.ones((2, 1), np.float32)  # kv_b_proj [128, 32] -> one 128x128 block: [1, 1]
    q["lm_head.weight_scale_inv"] = np.ones((4, 1), np.float32)  # lm_head stays f32
    path = write(tmp_path, tiny_cfg, q)
    err = load_error(path)
    msg, file = str(err), path / "model.safetensors"
    assert len(err.problems) == 3
    assert f"missing weight_scale_inv (1):\n    '{L1}.self_attn.o_proj.weight_scale_inv' for FP8" in msg
    assert f"'{kv_b}' in {file}: F32 [2, 1], expected F32 [1, 1] (weight [128, 32], block [128, 128])" in msg
    assert f"weight_scale_inv on a non-FP8 weight (1):\n    'lm_head.weight_scale_inv' in {file}" in msg


def test_scale_of_a_norm_is_unexpected(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, {**tiny_f32, f"{NORM[:-6]}.weight_scale_inv": np.ones((1, 1), np.float32)})
    assert "unexpected (1)" in str(load_error(path))


def test_inconsistent_expert_formats(tmp_path, tiny_cfg, tiny_f32):
    q = quantize_linears(tiny_f32, tiny_cfg)
    name = f"{L1}.mlp.experts.3.down_proj.weight"
    q[name] = tiny_f32[name].astype(ml_dtypes.bfloat16)
    del q[name + "_scale_inv"]
    msg = str(load_error(write(tmp_path, tiny_cfg, q)))
    assert "layers.1.mlp.experts.down_proj: experts stored as ['BF16', 'F8_E4M3']" in msg


def test_duplicate_tensor_across_shards(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, tiny_f32, max_shard_bytes=40_000)
    save_file({NORM: tiny_f32[NORM], "pad": np.zeros(1, np.float32)}, str(path / "extra.safetensors"))
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["pad"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    msg = str(load_error(path))
    assert f"duplicate (1):\n    '{NORM}' in both {path / 'extra.safetensors'} and {path}/model-0000" in msg


def test_truncated_shard(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, tiny_f32, max_shard_bytes=40_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    err = load_error(path)
    assert f"in {shard}: needs bytes up to" in str(err) and "truncated" in str(err)


def test_corrupt_header(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, tiny_f32)
    file = path / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8:9] = b"#"  # the JSON's opening brace
    file.write_bytes(bytes(raw))
    assert f"{file}: corrupt header (not JSON" in str(load_error(path))
    raw[:8] = (10**12).to_bytes(8, "little")
    file.write_bytes(bytes(raw))
    assert f"{file}: corrupt header length 1000000000000" in str(load_error(path))


def test_index_naming_missing_shard(tmp_path, tiny_cfg, tiny_f32):
    path = write(tmp_path, tiny_cfg, tiny_f32, max_shard_bytes=40_000)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert f"{shard} (holds" in str(load_error(path))


def test_mtp_layer_skipped_and_reported_once(tmp_path, tiny_cfg, tiny_f32, caplog):
    mtp = {"model.layers.3.eh_proj.weight": np.zeros((64, 128), np.float32),
           "model.layers.3.enorm.weight": np.ones(64, np.float32),
           "model.layers.3.self_attn.q_a_proj.weight": np.zeros((48, 64), np.float32),
           "model.layers.3.shared_head.head.weight": np.zeros((512, 64), np.float32)}
    path = write(tmp_path, tiny_cfg, {**tiny_f32, **mtp})
    with caplog.at_level(logging.INFO, logger="jaxmoe.loading"):
        with open_checkpoint(path) as ck:
            assert sorted(ck.skipped) == sorted(mtp)
    reports = [r for r in caplog.records if "MTP" in r.getMessage()]
    assert len(reports) == 1 and "skipping 4 tensors" in reports[0].getMessage()
    cfg, w = load_checkpoint(path)
    assert len(w.layers) == tiny_cfg.num_hidden_layers


def test_tied_embeddings(tmp_path, tiny_cfg, tiny_f32):
    cfg = tiny_cfg.replace(tie_word_embeddings=True)
    del tiny_f32["lm_head.weight"]
    _, w = load_checkpoint(write(tmp_path, cfg, tiny_f32))
    assert isinstance(w.lm_head, DenseWeight) and w.lm_head.weight is w.embed_tokens


def test_nothing_mapped_after_accounting_error(tmp_path, tiny_cfg, tiny_f32, mapped_files):
    del tiny_f32[NORM]
    path = write(tmp_path, tiny_cfg, tiny_f32, max_shard_bytes=40_000)
    load_error(path)
    gc.collect()
    assert not mapped_files(path)


def test_nothing_survives_a_failure_mid_load(tmp_path, tiny_cfg, tiny_f32, mapped_files, monkeypatch):
    """A failure after tensors were read (e.g. device out of memory): the error propagates,
    no Weights object exists, and the files are unmapped."""
    path = write(tmp_path, tiny_cfg, quantize_linears(tiny_f32, tiny_cfg), max_shard_bytes=40_000)
    real, calls = loader._linear, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 10:
            raise MemoryError("device out of memory")
        return real(*args)

    monkeypatch.setattr(loader, "_linear", failing)
    with pytest.raises(MemoryError):
        load_checkpoint(path)
    gc.collect()
    assert len(calls) == 10 and not mapped_files(path)
    monkeypatch.setattr(loader, "_linear", real)
    cfg, w = load_checkpoint(path)  # and the same checkpoint loads fine afterwards
    gc.collect()
    assert not mapped_files(path)
