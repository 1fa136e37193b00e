"""`jaxmoe convert --to int4`: what it writes, that the loader recognises it, that the
converted checkpoint generates on the pure-JAX path and on the CPU kernels, atomic failure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxmoe import quant, quant_int4
from jaxmoe.cli import main
from jaxmoe.loading import convert, int4_format
from jaxmoe.loading.loader import load_checkpoint, open_checkpoint
from jaxmoe.loading.safetensors_index import CheckpointError
from jaxmoe.loading.synthetic import write_synthetic_checkpoint

EXPERT = "model.layers.1.mlp.experts.3.down_proj"


@pytest.fixture(scope="module")
def int4_dir(tiny_fp8_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int4") / "ckpt"
    return convert.convert_int4(tiny_fp8_dir, dst, group=32, max_shard_bytes=150_000)


def test_writes_int4_experts_and_copies_the_rest(tiny_fp8_dir, int4_dir, tiny_cfg):
    meta = json.loads((int4_dir / int4_format.MARKER).read_text())
    assert meta["format"] == "int4" and meta["group_size"] == 32 and meta["scale_rule"] == "search"
    assert meta["converted_experts"] == 2 * tiny_cfg.n_routed_experts * 3
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (int4_dir / f).read_bytes() == (tiny_fp8_dir / f).read_bytes()
    with open_checkpoint(tiny_fp8_dir) as src, open_checkpoint(int4_dir) as dst:
        assert src.int4_group is None and dst.int4_group == 32
        # non-expert tensors: byte for byte, FP8 and scales included
        for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.q_b_proj.weight_scale_inv",
                     "model.layers.1.mlp.shared_experts.up_proj.weight", "lm_head.weight", "model.norm.weight"):
            a, b = src.array(name), dst.array(name)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
        assert f"{EXPERT}.weight" not in dst.store and f"{EXPERT}.weight_scale_inv" not in dst.store
        q, s = dst.array(f"{EXPERT}.qweight"), dst.array(f"{EXPERT}.scales")
        assert q.dtype == np.uint8 and q.shape == (64, 16) and s.dtype == np.float16 and s.shape == (64, 1)
        w = quant.dequantize_fp8_blocks(np.asarray(src.array(f"{EXPERT}.weight")),
                                        np.asarray(src.array(f"{EXPERT}.weight_scale_inv")))
        # the default (search) rule, computed from the dequantized FP8 weights
        q_want, s_want = quant_int4.quantize_int4(w, 32, scale_rule="search")
        np.testing.assert_array_equal(q, q_want)
        np.testing.assert_array_equal(s, s_want)
        arrays = dst.expert_arrays(1)
        assert len(arrays["gate_proj"]) == tiny_cfg.n_routed_experts and arrays["gate_proj_scales"][0].dtype == np.float16


def test_loads_as_int4_weights(int4_dir, tiny_cfg):
    cfg, w = load_checkpoint(int4_dir)
    ex = w.layers[1].mlp.experts
    assert isinstance(ex.gate_proj, quant_int4.Int4Weight)
    assert ex.gate_proj.shape == (tiny_cfg.n_routed_experts, 32, 64) and ex.down_proj.shape == (8, 64, 32)
    assert isinstance(w.layers[1].self_attn.q_b_proj, quant.Fp8Weight)  # non-experts keep their format


def test_converted_checkpoint_generates(int4_dir):
    """On the CPU kernels (the default on a CPU box; the pure-JAX path dequantizes Int4Weight,
    checked against the kernels in tests/cpu/test_int4_moe.py)."""
    import jaxmoe

    model = jaxmoe.load(int4_dir, cpu_kernels=True, n_slots=1)
    try:
        r = jaxmoe.generate(model, [0, 5, 6, 7], max_new_tokens=3)
    finally:
        model.close()
    assert len(r.token_ids) == 3 and all(0 <= t < 512 for t in r.token_ids)


def test_bf16_source_and_cli(tmp_path, tiny_cfg, capsys):
    src = write_synthetic_checkpoint(tmp_path / "bf16", tiny_cfg, fmt="bf16", seed=1, with_tokenizer=False)
    assert main(["convert", "--to", "int4", "--group", "64", "--int4-scale", "absmax", "--workers", "1",
                 str(src), str(tmp_path / "out")]) == 0
    assert "routed experts INT4 (group 64, absmax scales)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / int4_format.MARKER).read_text())["scale_rule"] == "absmax"
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "out") as b:
        w = np.asarray(a.array(f"{EXPERT}.weight"), np.float32)
        q, s = quant_int4.quantize_int4(w, 64, scale_rule="absmax")
        np.testing.assert_array_equal(b.array(f"{EXPERT}.qweight"), q)
        np.testing.assert_array_equal(b.array(f"{EXPERT}.scales"), s)
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["convert", "--to", "int4", "--int4-scale", "minmax", str(src), str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'minmax'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # user errors: exit 2 with a message, nothing written
    assert main(["convert", "--to", "int4", str(src), str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "--to", "int4", "--group", "48", str(src), str(tmp_path / "g48")]) == 2
    assert "group size" in capsys.readouterr().err and not (tmp_path / "g48").exists()
    assert main(["convert", "--to", "int4", str(tmp_path / "out"), str(tmp_path / "again")]) == 2
    assert "already an INT4 checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 3])
def test_failure_leaves_nothing(tiny_fp8_dir, tmp_path, monkeypatch, workers):
    calls = []

    def failing(w, group, name, scale_rule):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk full (simulated)")
        return real(w, group, name, scale_rule)

    real = quant_int4.quantize_int4
    monkeypatch.setattr(quant_int4, "quantize_int4", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert.convert_int4(tiny_fp8_dir, tmp_path / "dst", workers=workers)
    assert list(tmp_path.iterdir()) == []


def test_threads_write_the_same_bytes(tiny_fp8_dir, int4_dir, tmp_path):
    """1 worker and 4 workers (window of 8 experts ahead of the writer) give identical files."""
    one = convert.convert_int4(tiny_fp8_dir, tmp_path / "one", group=32, max_shard_bytes=150_000, workers=1)
    four = convert.convert_int4(tiny_fp8_dir, tmp_path / "four", group=32, max_shard_bytes=150_000, workers=4)
    names = sorted(f.name for f in int4_dir.iterdir())
    assert names == sorted(f.name for f in one.iterdir()) == sorted(f.name for f in four.iterdir())
    for f in names:
        if f != int4_format.MARKER:
            assert (one / f).read_bytes() == (four / f).read_bytes() == (int4_dir / f).read_bytes(), f


def test_fast_fp8_dequantize_is_bit_identical():
    """quant.dequantize_fp8_blocks (table + in-place block scales, what conversion uses) equals
    the plain definition: e4m3 cast to f32 times the block scale repeated to full size."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (256, 384), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # NaN codes included
    scale = rng.uniform(0.1, 2, (2, 3)).astype(np.float32)
    for shape in ((256, 384), (200, 300)):  # block multiples, and partial edge blocks
        q = w[: shape[0], : shape[1]]
        a = quant.dequantize_fp8_blocks(q, scale, (128, 128))
        b = q.astype(np.float32) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]]
        assert a.dtype == np.float32 and a.tobytes() == b.tobytes()


def test_bad_marker_and_missing_expert_tensor(int4_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    (bad / int4_format.MARKER).write_text(json.dumps({"format": "int4", "group_size": 40}))
    with pytest.raises(CheckpointError, match="not a valid INT4 marker"):
        open_checkpoint(bad)
    (bad / int4_format.MARKER).write_text(json.dumps({"format": "int4", "group_size": 32, "scale_rule": "nope"}))
    with pytest.raises(CheckpointError, match="not a valid INT4 marker.*scale rule"):
        open_checkpoint(bad)
    (bad / int4_format.MARKER).write_text(json.dumps({"format": "int4", "group_size": 64}))  # no rule: absmax
    with pytest.raises(CheckpointError, match=r"(?s)wrong shape.*scales.*expected \[32, 1\]"):
        open_checkpoint(bad)


def test_expert_store_from_converted_checkpoint(int4_dir, tiny_cfg):
    """ExpertStore.from_checkpoint packs the INT4 experts straight from the mmap (no Int4Weight
    in between): same fused-MoE output as the store built from the loaded weights."""
    from jaxmoe.cpu.expert_store import ExpertStore

    _, w = load_checkpoint(int4_dir)
    ex = w.layers[1].mlp.experts
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, tiny_cfg.hidden_size)).astype(np.float32)
    ids = np.array([[0, 5], [7, 2], [3, -1]], np.int32)
    wts = rng.random((3, 2)).astype(np.float32)
    with ExpertStore.from_checkpoint(int4_dir, layers=[1]) as a, ExpertStore(tiny_cfg.num_hidden_layers) as b:
        b.add_layer(1, ex.gate_proj, ex.up_proj, ex.down_proj)
        np.testing.assert_array_equal(a.moe(1, x, ids, wts), b.moe(1, x, ids, wts))
        assert a.nbytes == b.nbytes > 0


def test_streaming_source_reads_int4(int4_dir, tiny_cfg):
    """The stream-loading prefill's expert source gives Int4Weight views (not raw bytes as dense)."""
    from jaxmoe.loading.expert_source import CheckpointExperts

    _, w = load_checkpoint(int4_dir)
    with open_checkpoint(int4_dir) as ck:
        ex = CheckpointExperts(ck)(1)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got, want = getattr(ex, proj), getattr(w.layers[1].mlp.experts, proj)
            assert isinstance(got, quant_int4.Int4Weight) and got.shape == want.shape
            assert (got.k, got.group) == (want.k, want.group)
            np.testing.assert_array_equal(np.asarray(got.qweight), np.asarray(want.qweight))
            np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
