"""The persistent weights cache (jaxmoe.cpu.weights_cache): a cached load maps the packed
weights written by the first load and gives the same kernel outputs and tokens, bit for bit,
for FP8, BF16 and INT4 experts; a stale, foreign, truncated or corrupted cache is rebuilt with
a warning; two processes loading at once leave one sound cache; `jaxmoe cache` lists,
verifies and removes caches."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from benchmarks.load import drop_cache, resident_fraction
from jaxmoe.cli import main
from jaxmoe.config import ModelConfig
from jaxmoe.cpu import weights_cache as wc
from jaxmoe.cpu.handles import HostExperts, HostLinear
from jaxmoe.cpu.host_matrix import live_owners
from jaxmoe.loading import convert
from jaxmoe.loading.synthetic import write_synthetic_checkpoint

PROMPT = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wc_ckpts")
    out = {}
    for fmt in ("fp8", "bf16"):
        out[fmt] = root / fmt
        write_synthetic_checkpoint(out[fmt], ModelConfig.named("tiny"), fmt=fmt, seed=0, with_tokenizer=False)
    out["int4"] = convert.convert_int4(out["fp8"], root / "int4", group=32)
    return out


def _load(path, cache, **kw):
    return jaxmoe.load(path, cpu_kernels=True, weights_cache=cache, **kw)


def _outputs(model) -> dict:
    """Every host matrix's and MoE layer's output for fixed inputs, and greedy tokens."""
    rng = np.random.default_rng(0)
    leaves = jax.tree_util.tree_leaves(model.weights, is_leaf=lambda x: isinstance(x, (HostLinear, HostExperts)))
    out = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, HostLinear):
            x = rng.standard_normal((3, leaf.k)).astype(np.float32)
            out[f"linear{i}"] = live_owners[leaf.handle].linear(x)
        elif isinstance(leaf, HostExperts):
            x = rng.standard_normal((4, leaf.hidden)).astype(ml_dtypes.bfloat16)
            ids = rng.integers(0, leaf.n_experts, (4, 2), dtype=np.int32)
            w = rng.random((4, 2), dtype=np.float32)
            out[f"moe{leaf.layer}"] = live_owners[leaf.store].moe(leaf.layer, x, ids, w, np.float32)
    out["tokens"] = np.array(jaxmoe.generate(model, PROMPT, max_new_tokens=6).token_ids)
    return out


def _cache_dir(root):
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.parametrize("fmt", ["fp8", "bf16", "int4"])
def test_cached_load_is_bit_identical(ckpts, tmp_path, caplog, fmt):
    fresh = _load(ckpts[fmt], False)
    want = _outputs(fresh)
    fresh.close()
    root = tmp_path / "wcache"
    with caplog.at_level(logging.INFO, "jaxmoe.cpu.weights_cache"):
        first = _load(ckpts[fmt], root)  # loads, places, writes
        assert any("wrote" in r.message for r in caplog.records)
        got_first = _outputs(first)
        first.close()
        caplog.clear()
        data = _cache_dir(root) / "data.bin"
        drop_cache([data])
        cached = _load(ckpts[fmt], root)  # maps
        assert any("mapped" in r.message for r in caplog.records)
    m = wc.read_manifest(_cache_dir(root))
    ra = cached._cache_read  # reads what it mapped in the background: matrices, slabs, INT4 experts
    ra._thread.join(60)
    assert ra.advised == ra.total == _mapped_bytes(m) and resident_fraction([data]) >= _mapped_bytes(m) / m["data_bytes"] - 0.01
    got = _outputs(cached)
    cached.close()
    assert cached._cache_read is None
    assert m["host_matrices"] and m["layers"]
    assert (bool(m["slabs"]), any(lay.get("experts") for lay in m["layers"])) == ((True, False) if fmt != "int4"
                                                                                  else (False, True))
    assert want.keys() == got.keys() == got_first.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        np.testing.assert_array_equal(got_first[k], want[k], err_msg=k)


def _mapped_bytes(m) -> int:
    """Bytes of data.bin that a hit maps (all but the block scales, which it copies)."""
    n_experts = {lay["layer"]: lay["n_experts"] for lay in m["layers"]}
    return (sum(h["bytes"] for h in m["host_matrices"]) + sum(e["slot_bytes"] * n_experts[e["layer"]] for e in m["slabs"])
            + sum(e["bytes"] for lay in m["layers"] for trio in lay.get("experts") or [] for e in trio))


def _tokens(model):
    t = jaxmoe.generate(model, PROMPT, max_new_tokens=4).token_ids
    model.close()
    return t


def _rebuilt_with_warning(path, root, match):
    with pytest.warns(UserWarning, match=match):
        m = _load(path, root)
    return _tokens(m)


def test_foreign_version_key_and_layout_are_rejected(ckpts, tmp_path, monkeypatch):
    root = tmp_path / "wcache"
    want = _tokens(_load(ckpts["fp8"], root))
    d = _cache_dir(root)
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**man, "format_version": wc.PACK_FORMAT_VERSION + 1}))
    assert _rebuilt_with_warning(ckpts["fp8"], root, "packed format") == want
    assert wc.read_manifest(d)["format_version"] == wc.PACK_FORMAT_VERSION  # rebuilt
    (d / "manifest.json").write_text(json.dumps({**man, "key": "0" * 32}))  # a manifest of another key
    assert _rebuilt_with_warning(ckpts["fp8"], root, "names key") == want
    # another layout (or format version) is another key: never the old directory
    monkeypatch.setattr(wc, "LAYOUT", {**wc.LAYOUT, "tile_rows": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tokens(_load(ckpts["fp8"], root)) == want
    assert len([x for x in root.iterdir() if x.is_dir()]) == 2
    # a changed checkpoint (mtime) is another key too
    fields = wc.key_fields(ckpts["fp8"], dtype=np.float32, min_elements=0, experts_only=False)
    os.utime(ckpts["fp8"] / "config.json", ns=(1, 1))
    assert wc.cache_key(wc.key_fields(ckpts["fp8"], dtype=np.float32, min_elements=0, experts_only=False)) != \
        wc.cache_key(fields)


def _damage(d, damage: str) -> None:
    data = d / "data.bin"
    size = data.stat().st_size
    if damage == "truncate":
        os.truncate(data, size - 4096)
    elif damage == "corrupt":
        with open(data, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "no_manifest":
        (d / "manifest.json").unlink()
    else:
        (d / "manifest.json").write_text("{not json")


def test_damaged_cache_is_rebuilt_with_a_warning(ckpts, tmp_path):
    """Each damage makes the cache unsound (CacheError); a load then rebuilds it with a warning
    (end to end for a damaged data file, truncated then corrupted: one cache, rebuilt twice) and
    gives the fresh load's tokens; the rebuilt cache verifies in full and maps without a warning."""
    root = tmp_path / "wcache"
    want = _tokens(_load(ckpts["bf16"], root))
    d = _cache_dir(root)
    size = (d / "data.bin").stat().st_size
    for damage in ("no_manifest", "bad_json", "truncate", "corrupt"):
        copy = tmp_path / damage / d.name
        shutil.copytree(d, copy)
        _damage(copy, damage)
        with pytest.raises(wc.CacheError):
            wc.verify_dir(copy, "full", d.name)
    for damage in ("truncate", "corrupt"):
        _damage(d, damage)
        assert _rebuilt_with_warning(ckpts["bf16"], root, "not usable") == want, damage
        assert (d / "data.bin").stat().st_size == size
        wc.verify_dir(d, "full", d.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tokens(_load(ckpts["bf16"], root)) == want


def test_truncated_range_is_refused_by_the_native_adopt(ckpts, tmp_path):
    """Even past the manifest's checks, mapping a range beyond the file's end is an error (not SIGBUS)."""
    root = tmp_path / "wcache"
    _tokens(_load(ckpts["fp8"], root))
    d = _cache_dir(root)
    m = wc.read_manifest(d)
    os.truncate(d / "data.bin", m["slabs"][-1]["offset"])
    with pytest.raises(wc.CacheError, match="truncated"):
        wc._open(d, m)


def test_two_processes_loading_at_once_leave_one_sound_cache(ckpts, tmp_path):
    root = tmp_path / "wcache"
    script = textwrap.dedent(f"""
        import jaxmoe
        m = jaxmoe.load({str(ckpts['fp8'])!r}, cpu_kernels=True, weights_cache={str(root)!r})
        print(jaxmoe.generate(m, {PROMPT}, max_new_tokens=4).token_ids)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e
    assert len({o for o, _ in outs}) == 1
    d = _cache_dir(root)
    wc.verify_dir(d, "full", d.name)
    assert not [x for x in root.iterdir() if x.name.startswith(".tmp-")]
    assert _tokens(_load(ckpts["fp8"], root)) == json.loads(outs[0][0])


def test_exit_finishes_a_background_write(ckpts, tmp_path):
    """A process that ends while its default cache is still being written (a one-shot CLI run)
    finishes the write instead of losing it; the write is held 2 s so that it cannot end first."""
    root = tmp_path / "exit-root"
    script = textwrap.dedent(f"""
        import time
        import jaxmoe
        from jaxmoe.cpu import weights_cache as wc
        real = wc.write_cache
        def held(*a, **kw):
            time.sleep(2)
            return real(*a, **kw)
        wc.write_cache = held
        m = jaxmoe.load({str(ckpts['fp8'])!r}, cpu_kernels=True)
        assert m._cache_write is not None and not m._cache_write.join(0)
    """)
    env = dict(os.environ, JAXMOE_WEIGHTS_CACHE=str(root))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "finishing the weights cache write" in p.stderr
    d = _cache_dir(root)
    wc.verify_dir(d, "full", d.name)


def test_cache_cli_list_verify_rm(ckpts, tmp_path, capsys):
    root = tmp_path / "wcache"
    for fmt in ("fp8", "bf16"):
        _tokens(_load(ckpts[fmt], root))
    keys = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert main(["cache", "list", "--dir", str(root)]) == 0
    out = capsys.readouterr()
    assert all(k in out.out for k in keys) and "2 cache(s)" in out.err and str(ckpts["fp8"].resolve()) in out.out
    assert main(["cache", "verify", "--all", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.count(" ok") == 2
    with open(root / keys[0] / "data.bin", "r+b") as f:
        f.write(b"\xff" * 16)
    assert main(["cache", "verify", keys[0], "--dir", str(root)]) == 1
    assert "BAD" in capsys.readouterr().out
    assert main(["cache", "verify", "--dir", str(root)]) == 2  # neither KEY nor --all
    assert main(["cache", "rm", "nosuchkey", "--dir", str(root)]) == 2
    capsys.readouterr()
    assert main(["cache", "rm", keys[0], "--dir", str(root)]) == 0
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == keys[1:]
    assert main(["cache", "rm", "--all", "--dir", str(root)]) == 0
    assert not [d for d in root.iterdir() if d.is_dir()]


def test_weights_cache_off_and_default_root(ckpts, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("JAXMOE_CACHE_DIR", str(tmp_path / "user-cache"))
    _tokens(_load(ckpts["fp8"], False))
    assert not (tmp_path / "user-cache" / "weights").exists()
    monkeypatch.delenv("JAXMOE_WEIGHTS_CACHE")  # jaxmoe's own default: on, at the default root
    capsys.readouterr()
    model = _load(ckpts["fp8"], None)  # written in the background, and the user is told where
    assert f"jaxmoe: weights cache: writing {tmp_path / 'user-cache' / 'weights'}" in capsys.readouterr().err
    assert model._cache_write is not None and model._cache_write.join(60)
    model.close()
    assert len(wc.list_caches()) == 1 and wc.default_root() == tmp_path / "user-cache" / "weights"
    model = _load(ckpts["fp8"], True)  # maps it: nothing more written
    assert model._cache_write is None
    _tokens(model)
    assert len(wc.list_caches()) == 1
    monkeypatch.setenv("JAXMOE_WEIGHTS_CACHE", str(tmp_path / "env-root"))
    model = _load(ckpts["fp8"], None)  # not asked for by the call: written in the background
    assert model._cache_write is not None and model._cache_write.join(60)
    model.close()
    assert len(wc.list_caches(tmp_path / "env-root")) == 1


def test_background_write_serves_meanwhile_and_close_cancels_it(ckpts, tmp_path, monkeypatch):
    """The default cache is written on a thread after load returns: the model generates its own
    tokens meanwhile, a later load maps the finished cache; close() during a write cancels it and
    leaves no cache and no partial directory."""
    root = tmp_path / "bg"
    monkeypatch.setenv("JAXMOE_WEIGHTS_CACHE", str(root))
    want = _tokens(_load(ckpts["fp8"], False))
    real, started = wc.write_cache, threading.Event()

    def held(*a, cancel=None, **kw):  # the write waits until the model is closed
        started.set()
        cancel.wait(60)
        return real(*a, cancel=cancel, **kw)

    monkeypatch.setattr(wc, "write_cache", lambda *a, **kw: held(*a, **kw))
    model = _load(ckpts["fp8"], None)
    assert started.wait(60) and _tokens(model) == want  # generates while the write waits; closes the model
    assert model._cache_write is None
    assert not [d for d in root.iterdir() if d.is_dir()] if root.exists() else True  # no cache, no .tmp-*
    monkeypatch.setattr(wc, "write_cache", real)
    model = _load(ckpts["fp8"], None)
    writing = model._cache_write
    assert writing is not None and writing.join(60) and _tokens(model) == want
    d = _cache_dir(root)
    model = _load(ckpts["fp8"], None)  # mapped: nothing to write
    assert model._cache_write is None and _tokens(model) == want and _cache_dir(root) == d


def test_a_cancelled_write_raises_and_leaves_nothing(tmp_path):
    from jaxmoe.cpu.weights_cache_format import DataWriter, write_dir

    stop = threading.Event()
    stop.set()
    with open(tmp_path / "f", "wb") as f, pytest.raises(wc.CacheError, match="cancelled"):
        DataWriter(f, stop).put(b"x" * 10)
    (tmp_path / "root").mkdir()
    with pytest.raises(wc.CacheError, match="cancelled"):
        write_dir(tmp_path / "root", "k", {}, None, lambda w: {"at": w.put(b"x")}, stop)
    assert not list((tmp_path / "root").iterdir())


def test_too_many_mappings_or_no_disk_room_skip_the_write(ckpts, tmp_path, monkeypatch):
    root = tmp_path / "wcache"
    want = _tokens(_load(ckpts["fp8"], False))
    monkeypatch.setattr(wc, "MAX_MAPPINGS", 1)
    with pytest.warns(UserWarning, match="mmaps"):
        assert _tokens(_load(ckpts["fp8"], root)) == want
    monkeypatch.setattr(wc, "MAX_MAPPINGS", 30000)
    monkeypatch.setattr(wc, "_cache_bytes", lambda store, mats: 1 << 60)
    with pytest.warns(UserWarning, match="disk space"):
        assert _tokens(_load(ckpts["fp8"], root)) == want
    assert not [d for d in root.iterdir() if d.is_dir()]


@pytest.mark.parametrize("edit", ["drop", "reshape"])
def test_cache_that_does_not_match_the_placement_is_rebuilt(ckpts, tmp_path, edit):
    root = tmp_path / "wcache"
    want = _tokens(_load(ckpts["fp8"], root))
    d = _cache_dir(root)
    man = json.loads((d / "manifest.json").read_text())
    mats = man["host_matrices"]
    mats = mats[:-1] if edit == "drop" else [{**mats[0], "n": mats[0]["n"] + 4}, *mats[1:]]
    (d / "manifest.json").write_text(json.dumps({**man, "host_matrices": mats}))
    assert _rebuilt_with_warning(ckpts["fp8"], root, "does not match") == want
    assert len(wc.read_manifest(d)["host_matrices"]) == len(man["host_matrices"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tokens(_load(ckpts["fp8"], root)) == want
