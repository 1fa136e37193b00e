"""The safetensors reader: every dtype, zero-copy views, sharding, and each structural error."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxmoe.loading.safetensors_index import (
    CheckpointError,
    SafetensorsCheckpoint,
    SafetensorsFile,
    stacked_view,
)
from jaxmoe.loading.synthetic import write_checkpoint


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with a hand-made header (to corrupt it on purpose)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


ALL_DTYPES = {
    "f64": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
    "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "f16": np.arange(5, dtype=np.float16),
    "i64": np.arange(-3, 3, dtype=np.int64),
    "i32": np.arange(7, dtype=np.int32),
    "i8": np.arange(-4, 4, dtype=np.int8),
    "u8": np.arange(9, dtype=np.uint8).reshape(3, 3),
    "bool": np.array([True, False, True]),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 4), np.float32),
}


def test_reads_what_the_safetensors_library_writes(tmp_path):
    save_file(ALL_DTYPES, str(tmp_path / "a.safetensors"), metadata={"format": "np"})
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert f.metadata == {"format": "np"}
        assert set(f.tensors) == set(ALL_DTYPES)
        for name, want in ALL_DTYPES.items():
            got = f.array(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_fp8_and_bf16_views_match_torch(tmp_path):
    """F8_E4M3 and BF16 (which safetensors' numpy API cannot return) read bit-exactly."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    e4m3 = np.clip(rng.normal(0, 100, (5, 7)), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    bf16 = rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
    write_checkpoint(tmp_path / "ck", {"vocab_size": 1}, {"q": e4m3, "b": bf16})
    file = tmp_path / "ck" / "model.safetensors"
    with SafetensorsFile(file) as f, safe_open(str(file), "pt") as ref:
        assert (f.tensors["q"].dtype, f.tensors["b"].dtype) == ("F8_E4M3", "BF16")
        assert f.array("q").dtype == np.dtype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(f.array("q").view(np.uint8), ref.get_tensor("q").view(torch.uint8).numpy())
        np.testing.assert_array_equal(f.array("b").view(np.uint16), ref.get_tensor("b").view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(f.array("q").view(np.uint8), e4m3.view(np.uint8))


def test_views_are_zero_copy_and_read_only(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "a.safetensors"))
    f = SafetensorsFile(tmp_path / "a.safetensors")
    a, b = f.array("w"), f.array("w")
    assert not a.flags.owndata and not a.flags.writeable
    assert np.shares_memory(a, b)
    with pytest.raises(ValueError):
        a[0, 0] = 2
    f.close()  # a live view keeps the mapping alive rather than dangling
    assert float(a.sum()) == 64 * 64


def test_close_unmaps(tmp_path, mapped_files):
    save_file({"w": np.ones((256, 256), np.float32)}, str(tmp_path / "a.safetensors"))
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert float(f.array("w")[3, 3]) == 1.0
    gc.collect()
    assert mapped_files(tmp_path)
    f.close()
    assert not mapped_files(tmp_path)
    with pytest.raises(CheckpointError, match="closed"):
        f.array("w")


@pytest.mark.parametrize(
    "header, data, length, match",
    [
        ({"w": entry("F32", [2], 0, 8)}, b"\0" * 8, 10**9, r"corrupt header length 1000000000"),
        (b"{not json", b"", None, r"corrupt header \(not JSON"),
        (b"[1, 2]", b"", None, r"not a JSON object"),
        ({"w": entry("F32", [2, 2], 0, 8)}, b"\0" * 8, None, r"'w'.*hold 8 bytes, shape \[2, 2\] x F32 needs 16"),
        ({"w": entry("F32", [4], 0, 16)}, b"\0" * 8, None, r"(?s)truncated.*'w'.*needs bytes up to"),
        ({"w": entry("F32", [4], 8, 4)}, b"\0" * 16, None, r"'w'.*malformed entry"),
        ({"w": entry("Q7", [4], 0, 4)}, b"\0" * 4, None, r"'w'.*unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, r"'w'.*malformed entry"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12, None,
         r"(?s)overlapping.*'a' and 'b'"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
         b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None, r"'w' listed twice"),
    ],
    ids=["header-length", "bad-json", "not-object", "size-mismatch", "out-of-range", "reversed-offsets",
         "unknown-dtype", "no-offsets", "overlap", "duplicate-in-header"],
)
def test_corrupt_files_name_tensor_and_file(tmp_path, header, data, length, match):
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=match) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_truncated_file(tmp_path):
    save_file({"a": np.ones(100, np.float32), "b": np.zeros(100, np.float32)}, str(tmp_path / "m.safetensors"))
    full = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(full[:-10])
    with pytest.raises(CheckpointError, match=r"'b' in .*m\.safetensors: needs bytes up to 928, file has 918"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(full[:5])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated file"):
        SafetensorsCheckpoint(tmp_path)


def test_all_problems_reported_together(tmp_path):
    header = {f"t{i}": entry("F32", [3], 0, 8) for i in range(14)}
    path = raw_file(tmp_path / "x.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert len(e.value.problems) == 14
    assert "corrupt entry (14)" in str(e.value) and "... and 4 more" in str(e.value)


# ---- sharded checkpoints ----------------------------------------------------------------------


def sharded(tmp_path: Path) -> Path:
    """Two shards: a, b in the first, c, d in the second (and the index)."""
    tensors = {n: np.full((64,), i, np.float32) for i, n in enumerate("abcd")}
    return write_checkpoint(tmp_path / "ck", {"vocab_size": 1}, tensors, max_shard_bytes=512)


def edit_index(path: Path, fn) -> None:
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    fn(idx["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_sharded_reads_through_index(tmp_path):
    path = sharded(tmp_path)
    assert len(list(path.glob("*.safetensors"))) == 2
    with SafetensorsCheckpoint(path) as ck:
        assert sorted(ck) == ["a", "b", "c", "d"] and len(ck) == 4
        assert ck.info("c").file.name == "model-00002-of-00002.safetensors"
        np.testing.assert_array_equal(ck.array("b"), np.full((64,), 1, np.float32))
        np.testing.assert_array_equal(ck.array("d"), np.full((64,), 3, np.float32))
        assert ck.total_bytes == 4 * 256


def test_single_file_path(tmp_path):
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "one.safetensors"))
    with SafetensorsCheckpoint(tmp_path / "one.safetensors") as ck:
        assert list(ck) == ["a"]


def test_index_names_missing_file(tmp_path):
    path = sharded(tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"(?s)missing.*model-00002-of-00002\.safetensors \(holds 2 tensors, e.g. 'c'\)"):
        SafetensorsCheckpoint(path)


def test_index_lists_tensor_absent_from_its_shard(tmp_path):
    path = sharded(tmp_path)
    edit_index(path, lambda wm: wm.update(ghost="model-00001-of-00002.safetensors", c="model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError) as e:
        SafetensorsCheckpoint(path)
    msg = str(e.value)
    assert "listed in index but not in its shard (2)" in msg
    assert "'ghost' -> " in msg and "'c' -> " in msg and "model-00001-of-00002.safetensors" in msg


def test_tensor_in_shard_but_not_in_index(tmp_path):
    path = sharded(tmp_path)
    edit_index(path, lambda wm: wm.pop("c"))
    with pytest.raises(CheckpointError, match=r"(?s)not listed in index.*'c' in .*model-00002-of-00002"):
        SafetensorsCheckpoint(path)


def test_duplicate_tensor_across_shards(tmp_path):
    path = sharded(tmp_path)
    save_file({"a": np.zeros(64, np.float32), "z": np.zeros(1, np.float32)}, str(path / "extra.safetensors"))
    edit_index(path, lambda wm: wm.update(z="extra.safetensors"))
    with pytest.raises(CheckpointError) as e:
        SafetensorsCheckpoint(path)
    assert e.value.problems == [f"'a' in both {path / 'extra.safetensors'} and {path / 'model-00001-of-00002.safetensors'}"]


def test_corrupt_index_and_empty_dir(tmp_path):
    path = sharded(tmp_path)
    (path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt index"):
        SafetensorsCheckpoint(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        SafetensorsCheckpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path / "nowhere")


def test_failed_open_unmaps_the_good_shards(tmp_path, mapped_files):
    path = sharded(tmp_path)
    edit_index(path, lambda wm: wm.pop("c"))
    with pytest.raises(CheckpointError):
        SafetensorsCheckpoint(path)
    gc.collect()
    assert not mapped_files(path)


def test_stacked_view():
    buf = np.arange(40, dtype=np.float32)
    views = [buf[i * 10 : i * 10 + 6].reshape(2, 3) for i in range(4)]
    s = stacked_view(views)
    assert s.shape == (4, 2, 3) and np.shares_memory(s, buf)
    np.testing.assert_array_equal(s, np.stack(views))
    assert stacked_view([views[0], views[2], views[3]]) is None  # uneven spacing
    assert stacked_view([views[0], np.zeros((2, 3), np.float32)]) is None  # another buffer
