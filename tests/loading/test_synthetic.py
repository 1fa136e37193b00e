"""Synthetic checkpoints: writer -> loader round trips (f32, bf16, FP8), sharding, atomic writes,
the tokenizer, config spellings, and the loader's lower-level API."""

from __future__ import annotations

import json

import jax.numpy as jnp
import jinja2
import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxmoe.config import ModelConfig, QuantConfig
from jaxmoe.loading import hf_map, synthetic
from jaxmoe.loading.loader import load_checkpoint, open_checkpoint
from jaxmoe.loading.safetensors_index import INDEX_NAME, SafetensorsCheckpoint, stacked_view
from jaxmoe.loading.synthetic import quantize_linears, synthetic_tensors, write_checkpoint, write_synthetic_checkpoint
from jaxmoe.loading.tokenizer_data import SPECIAL_TOKENS, train_tokenizer
from jaxmoe.quant import DenseWeight, Fp8Weight, dequantize, dequantize_fp8_blocks

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def assert_loaded_equals(cfg, weights, tensors: dict[str, np.ndarray], dtype=np.float32):
    """Every tensor of `tensors` is in `weights`, bit for bit (floats after the cast to `dtype`)."""
    for name, spec in hf_map.expected_tensors(cfg).items():
        got, want = hf_map.lookup(weights, spec), tensors[name]
        if spec.kind == "linear" and want.dtype == E4M3:
            assert isinstance(got, Fp8Weight), name
            np.testing.assert_array_equal(np.asarray(got.weight).view(np.uint8), want.view(np.uint8), err_msg=name)
            np.testing.assert_array_equal(np.asarray(got.weight_scale_inv), tensors[spec.scale_name], err_msg=name)
        elif spec.kind == "linear":
            assert isinstance(got, DenseWeight) and got.weight.dtype == want.dtype, name
            np.testing.assert_array_equal(np.asarray(got.weight), want, err_msg=name)
        else:
            want_dtype = np.float32 if spec.kind == "bias" else dtype
            assert got.dtype == want_dtype, name
            np.testing.assert_array_equal(np.asarray(got), want.astype(want_dtype), err_msg=name)


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_round_trip(tmp_path, tiny_cfg, fmt):
    path = write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, fmt=fmt, with_tokenizer=False)
    cfg, w = load_checkpoint(path)
    assert cfg == tiny_cfg.replace(dtype="float32" if fmt == "f32" else "bfloat16")
    tensors = synthetic_tensors(tiny_cfg, fmt=fmt)
    assert_loaded_equals(cfg, w, tensors)
    if fmt == "bf16":  # Linears keep their stored dtype; the rest follows `dtype`
        _, w16 = load_checkpoint(path, dtype=jnp.bfloat16)
        assert_loaded_equals(cfg, w16, tensors, dtype=ml_dtypes.bfloat16)
        assert w16.layers[0].self_attn.q_a_proj.weight.dtype == jnp.bfloat16


def test_fp8_round_trip(tiny_fp8_dir, tiny_cfg):
    """The FP8 checkpoint as real DeepSeek ones are: e4m3 + fp32 block scales on every Linear but
    lm_head; embeddings, norms, router, lm_head bf16; the router bias fp32."""
    cfg, w = load_checkpoint(tiny_fp8_dir)
    assert cfg.quantization == QuantConfig() and cfg.bos_token_id == 0 and cfg.eos_token_id == (1,)
    tensors = synthetic_tensors(tiny_cfg, fmt="fp8")  # the streamed writer wrote exactly these
    assert_loaded_equals(cfg, w, tensors)
    with SafetensorsCheckpoint(tiny_fp8_dir) as st:
        dtypes = {n: st.info(n).dtype for n in st}
    for name, spec in hf_map.expected_tensors(cfg).items():
        fp8 = spec.kind == "linear" and name != "lm_head.weight"
        assert dtypes[name] == ("F32" if spec.kind == "bias" else "F8_E4M3" if fp8 else "BF16"), name
        assert (dtypes.get(spec.scale_name) == "F32") == fp8, name
    assert len(dtypes) == len(hf_map.expected_tensors(cfg)) + sum(d == "F8_E4M3" for d in dtypes.values())
    o = w.layers[1].self_attn.o_proj
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_allclose(np.asarray(dequantize(o)), dequantize_fp8_blocks(tensors[name], tensors[name + "_scale_inv"]),
                               rtol=0, atol=0)


def test_multi_block_quantization_round_trip(tmp_path, tiny_cfg, tiny_f32):
    """quantize_linears with 32x32 blocks (partial edge blocks: 48 = 32 + 16) through the loader."""
    cfg = tiny_cfg.replace(quantization=QuantConfig(weight_block_size=(32, 32)))
    q = quantize_linears(tiny_f32, cfg)
    assert q["lm_head.weight"] is tiny_f32["lm_head.weight"]
    specs = hf_map.expected_tensors(cfg)
    for name, spec in specs.items():
        if spec.kind == "linear" and name != "lm_head.weight":
            assert q[name].dtype == E4M3 and q[spec.scale_name].shape == spec.scale_shape((32, 32))
            deq = dequantize_fp8_blocks(q[name], q[spec.scale_name], (32, 32))
            assert np.max(np.abs(deq - tiny_f32[name])) <= np.max(np.abs(tiny_f32[name])) / 14, name
        else:
            assert q[name] is tiny_f32[name]
    assert q["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)
    loaded_cfg, w = load_checkpoint(write_checkpoint(tmp_path / "ck", cfg, q))
    assert loaded_cfg.quantization.weight_block_size == (32, 32)
    assert w.layers[2].mlp.experts.down_proj.block == (32, 32)
    assert_loaded_equals(loaded_cfg, w, q)


def test_sharding(tmp_path, tiny_cfg):
    one = write_synthetic_checkpoint(tmp_path / "one", tiny_cfg, with_tokenizer=False, max_shard_bytes=None)
    many = write_synthetic_checkpoint(tmp_path / "many", tiny_cfg, with_tokenizer=False, max_shard_bytes=60_000)
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"] and not (one / INDEX_NAME).exists()
    shards = sorted(many.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / INDEX_NAME).read_text())
    with SafetensorsCheckpoint(one) as a, SafetensorsCheckpoint(many) as b:
        assert set(index["weight_map"]) == set(a) == set(b)
        assert index["metadata"]["total_size"] == a.total_bytes == b.total_bytes
        for f in b.files.values():
            assert sum(t.nbytes for t in f.tensors.values()) <= 60_000 or len(f.tensors) == 1  # embeddings
            spans = sorted((t.start, t.end) for t in f.tensors.values())
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # no holes
            assert all(t.start % t.np_dtype.itemsize == 0 for t in f.tensors.values())  # aligned
        for n in a:
            np.testing.assert_array_equal(a.array(n).view(np.uint8), b.array(n).view(np.uint8))


def test_safetensors_library_reads_our_files(tmp_path, tiny_cfg):
    from safetensors.numpy import load_file

    path = write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, fmt="f32", with_tokenizer=False)
    theirs = load_file(str(path / "model.safetensors"))
    ours = synthetic_tensors(tiny_cfg, fmt="f32")
    assert set(theirs) == set(ours)
    for n in ours:
        np.testing.assert_array_equal(theirs[n], ours[n])


def test_write_is_atomic(tmp_path, tiny_cfg, monkeypatch):
    calls = []
    real = synthetic._random_fp8

    def failing(*a):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(synthetic, "_random_fp8", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, max_shard_bytes=20_000)
    assert len(calls) == 30 and list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path, tiny_cfg):
    path = write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, fmt="f32", seed=0, with_tokenizer=False)
    with pytest.raises(FileExistsError):
        write_synthetic_checkpoint(path, tiny_cfg, fmt="f32", seed=1)
    write_synthetic_checkpoint(path, tiny_cfg, fmt="f32", seed=1, overwrite=True, with_tokenizer=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    _, w = load_checkpoint(path)
    want = synthetic_tensors(tiny_cfg, fmt="f32", seed=1)["model.norm.weight"]
    np.testing.assert_array_equal(np.asarray(w.norm), want)
    assert not np.array_equal(want, synthetic_tensors(tiny_cfg, fmt="f32", seed=0)["model.norm.weight"])


def test_config_json(tiny_fp8_dir, tmp_path, tiny_cfg):
    d = json.loads((tiny_fp8_dir / "config.json").read_text())
    assert d["scoring_func"] == "sigmoid" and d["torch_dtype"] == "bfloat16"
    assert d["quantization_config"]["weight_block_size"] == [128, 128]
    assert (d["bos_token_id"], d["eos_token_id"]) == (0, 1)
    f32 = write_synthetic_checkpoint(tmp_path / "f32", tiny_cfg.replace(quantization=QuantConfig()), fmt="f32",
                                     with_tokenizer=False)
    d = json.loads((f32 / "config.json").read_text())
    assert "quantization_config" not in d and d["torch_dtype"] == "float32"


def test_random_init_is_sane(tiny_cfg):
    t = synthetic_tensors(ModelConfig.named("demo"), fmt="fp8")
    for name in ("model.layers.2.mlp.experts.5.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.3.self_attn.kv_b_proj.weight"):
        w = dequantize_fp8_blocks(t[name], t[name + "_scale_inv"])
        assert abs(w.std() * np.sqrt(w.shape[1]) - 1) < 0.1, name
        assert t[name + "_scale_inv"].std() > 0  # scales vary per block
    norm = t["model.layers.1.input_layernorm.weight"].astype(np.float32)
    assert abs(norm.mean() - 1) < 0.02 and 0 < norm.std() < 0.1
    assert np.abs(t["model.layers.1.mlp.gate.e_score_correction_bias"]).max() < 0.1


def test_tokenizer(tiny_fp8_dir, tiny_cfg):
    tok = Tokenizer.from_file(str(tiny_fp8_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == tiny_cfg.vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = 'def f(x):\n    return x ** 2  # «quadrat» ✓'
    enc = tok.encode(text)
    assert enc.ids[0] == 0 and max(enc.ids) < tiny_cfg.vocab_size and len(enc.ids) < len(text.encode())
    assert tok.decode(enc.ids) == text
    tc = json.loads((tiny_fp8_dir / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"]) == SPECIAL_TOKENS[:2]
    chat = jinja2.Environment().from_string(tc["chat_template"]).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        bos_token=tc["bos_token"], add_generation_prompt=True)
    assert chat == ("<|begin▁of▁sentence|>Be brief.<|User|>Hi<|Assistant|>Hello<|end▁of▁sentence|>"
                    "<|User|>Bye<|Assistant|>")
    ids = tok.encode(chat, add_special_tokens=False).ids
    assert ids[0] == 0 and ids.count(2) == 2 and ids.count(3) == 2 and ids.count(1) == 1
    assert train_tokenizer(tiny_cfg.vocab_size).to_str() == tok.to_str()  # deterministic
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(100)


def hf5_spelling(d: dict, experts_key: str) -> dict:
    """The transformers 5.x spelling of an original DeepSeek config.json."""
    d = dict(d)
    rp = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
    rp["rope_type"] = rp.pop("type")
    d["rope_parameters"] = rp
    d["dtype"] = d.pop("torch_dtype")
    d[experts_key] = d.pop("n_routed_experts")
    return d


@pytest.mark.parametrize("experts_key", ["n_routed_experts", "num_local_experts", "num_experts"])
def test_config_spellings(tmp_path, tiny_cfg, tiny_f32, experts_key):
    original = json.loads(json.dumps(tiny_cfg.to_hf_dict()))
    new = hf5_spelling(original, experts_key)
    assert "rope_scaling" not in new and "torch_dtype" not in new
    assert ModelConfig.from_dict(original) == ModelConfig.from_dict(new) == tiny_cfg
    cfg, _ = load_checkpoint(write_checkpoint(tmp_path / "ck", new, tiny_f32))
    assert cfg == tiny_cfg


def test_expert_arrays_are_zero_copy(tmp_path, tiny_cfg):
    path = write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, with_tokenizer=False, max_shard_bytes=None)
    _, w = load_checkpoint(path)
    with open_checkpoint(path) as ck:
        assert ck.skipped == [] and ck.block == (128, 128)
        arrays = ck.expert_arrays(2)
        assert sorted(arrays) == sorted(["gate_proj", "up_proj", "down_proj", "gate_proj_scale_inv",
                                         "up_proj_scale_inv", "down_proj_scale_inv"])
        views = arrays["down_proj"]
        assert len(views) == 8 and views[0].shape == (64, 32) and views[0].dtype == E4M3
        assert not any(v.flags.owndata or v.flags.writeable for v in views)
        stacked = stacked_view(views)  # the writer lays each proj's experts evenly spaced
        assert stacked is not None and stacked.shape == (8, 64, 32) and np.shares_memory(stacked, views[3])
        ref = w.layers[2].mlp.experts.down_proj
        np.testing.assert_array_equal(stacked.view(np.uint8), np.asarray(ref.weight).view(np.uint8))
        np.testing.assert_array_equal(np.stack(arrays["down_proj_scale_inv"]), np.asarray(ref.weight_scale_inv))
        with pytest.raises(ValueError, match="not a MoE layer"):
            ck.expert_arrays(0)


def test_load_without_experts(tiny_fp8_dir):
    _, w = load_checkpoint(tiny_fp8_dir, load_experts=False)
    assert w.layers[1].mlp.experts is None and w.layers[1].mlp.shared_experts is not None


def test_progress_bar(tiny_fp8_dir, capsys):
    load_checkpoint(tiny_fp8_dir)  # stderr is not a terminal: silent
    assert capsys.readouterr().err == ""
    load_checkpoint(tiny_fp8_dir, progress=True)
    n = len(hf_map.expected_tensors(ModelConfig.from_file(tiny_fp8_dir)))
    err = capsys.readouterr().err
    assert "loading ckpt [" in err and f"{n}/{n} tensors" in err and err.endswith("\n")


def test_named_configs_parse():
    for name in ("tiny", "demo", "bench-v3-mid", "deepseek-v3"):
        cfg = ModelConfig.named(name)
        assert cfg.scoring_func == "sigmoid" and cfg.rope_scaling is not None
    v3 = ModelConfig.named("deepseek-v3")
    assert (v3.num_hidden_layers, v3.n_routed_experts, v3.num_nextn_predict_layers) == (61, 256, 1)
    assert v3.rope_scaling.factor == 40 and v3.quantization.weight_block_size == (128, 128)
    bench = ModelConfig.named("bench-v3-mid")
    assert bench.n_routed_experts // bench.n_group == 4 and bench.quantization is not None
    spec = hf_map.expected_tensors(bench)["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    assert spec.shape == (576, 7168) and spec.scale_shape((128, 128)) == (5, 56)
