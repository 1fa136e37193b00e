"""The CPU kernels' precision option on the user surfaces: `jaxmoe.load(cpu_precision=...)`,
the runtime presets' `cpu_precision` field and the CLI's `--cpu-precision` all reach the
native library (process-wide), and a bad value is a ValueError naming the parameter."""

from __future__ import annotations

import json

import pytest

import jaxmoe
from jaxmoe import cli
from jaxmoe.serving.presets import CPU_PRECISIONS, RuntimeConfig


@pytest.fixture
def nat():
    """The native library; its process-wide precision is restored after the test."""
    from jaxmoe.cpu import _lib

    try:
        lib = _lib.load()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"jaxmoe's CPU kernels are unavailable here: {e}")
    prev = lib.precision()
    yield lib
    lib.set_precision(prev)


def test_names_match_the_library():
    from jaxmoe.cpu import _lib

    assert CPU_PRECISIONS == _lib.PRECISION_NAMES == ("exact", "bf16")


def test_presets_leave_the_library_default():
    for preset in ("cpu-only", "gpu+cpu-experts", "2gpu+cpu-experts"):
        assert RuntimeConfig.load(preset).cpu_precision is None
    assert RuntimeConfig.load("cpu-only", cpu_precision="bf16").cpu_precision == "bf16"


@pytest.mark.parametrize("bad", ["fp16", "EXACT", "", 1])
def test_bad_value_is_rejected(tiny_ckpt, bad):
    with pytest.raises(ValueError, match="cpu_precision"):
        RuntimeConfig(cpu_precision=bad)
    with pytest.raises(ValueError, match="cpu_precision"):
        jaxmoe.load(tiny_ckpt, cpu_precision=bad)


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_load_sets_the_library_precision(tiny_ckpt, nat, precision):
    other = "bf16" if precision == "exact" else "exact"
    nat.set_precision(other)
    m = jaxmoe.load(tiny_ckpt, cpu_kernels=True, cpu_precision=precision, n_slots=1)
    try:
        assert m.cpu_kernels and m.runtime.cpu_precision == precision
        assert nat.precision() == precision
    finally:
        m.close()


def test_none_leaves_the_library_setting(tiny_ckpt, nat):
    nat.set_precision("bf16")
    m = jaxmoe.load(tiny_ckpt, cpu_kernels=True, n_slots=1)
    m.close()
    assert nat.precision() == "bf16"


def test_preset_field_reaches_the_library(tiny_ckpt, nat, tmp_path):
    preset = {"accelerators": 0, "routed_experts": "host", "n_slots": 1, "cpu_precision": "bf16"}
    path = tmp_path / "bf16-cpu.json"
    path.write_text(json.dumps(preset))
    nat.set_precision("exact")
    m = jaxmoe.load(tiny_ckpt, cpu_kernels=True, runtime=str(path))
    try:
        assert m.runtime.preset == "bf16-cpu" and nat.precision() == "bf16"
    finally:
        m.close()
    m = jaxmoe.load(tiny_ckpt, cpu_kernels=True, runtime=str(path), cpu_precision="exact")  # the keyword wins
    m.close()
    assert nat.precision() == "exact"


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_cli_flag_reaches_load(monkeypatch, tmp_path, command):
    """--cpu-precision on every subcommand that loads a model; argparse refuses other values."""
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        raise cli.UserError("stop here")

    monkeypatch.setattr(jaxmoe, "load", fake_load)
    monkeypatch.setattr(cli, "_write_synthetic", lambda out, *a, **k: out.mkdir(parents=True, exist_ok=True))
    argv = (["generate", "--model", str(tmp_path), "--prompt", "x"] if command == "generate"
            else ["demo", "--config", "tiny", "--cache-dir", str(tmp_path)])
    assert cli.main([*argv, "--cpu-precision", "bf16"]) == 2
    assert seen["cpu_precision"] == "bf16"
    seen.clear()
    assert cli.main(argv) == 2
    assert seen["cpu_precision"] is None
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*argv, "--cpu-precision", "fp16"])
    assert e.value.code == 2
