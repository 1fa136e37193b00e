"""The package as pip builds and installs it, away from the checkout.

The wheel is built once per module (`pip wheel . --no-deps --no-build-isolation`) from a clean
copy of the checkout's files (tracked and untracked-not-ignored: what a clone has plus work not
yet committed; a build in the checkout itself would reuse its stale build/ folder, which can hide
missing package data, and write there while others work). It is installed with `--no-deps` into
a fresh venv whose dependencies come from this interpreter's site-packages through a `.pth` file
added after the install (after the venv's own site-packages on sys.path: the installed jaxmoe
wins; a plain path line, so the editable install's finder there is never loaded). Everything
then runs from a directory outside the checkout, with the user cache in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLATFORM_TAG = sysconfig.get_platform().replace("-", "_").replace(".", "_")
IGNORED = ("__pycache__", "*.pyc", "*.so", "*.o", ".git", ".venv", "build", "dist", "*.egg-info", ".cache",
           ".pytest_cache", ".hypothesis", "_native", ".gpucheck", "out")


def _source_files() -> list[str] | None:
    """The checkout's files relative to REPO (git's view), or None without git."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in res.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def _copy_checkout(dst: Path) -> None:
    files = _source_files()
    if files is None:
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(*IGNORED), dirs_exist_ok=True)
        return
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)


def _clean_env(**extra: str) -> dict[str, str]:
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "JAXMOE_CALIBRATION", "JAXMOE_CPU_BUILD_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def _check(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _copy_checkout(src)
    _check([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)],
           cwd=src, env=_clean_env())
    (whl,) = dist.glob("*.whl")
    return whl


class Installed:
    """The fresh venv with the wheel installed, and a place outside the checkout to run in."""

    def __init__(self, root: Path):
        self.root, self.venv, self.work, self.cache = root, root / "venv", root / "work", root / "cache"
        self.python, self.jaxmoe = self.venv / "bin" / "python", self.venv / "bin" / "jaxmoe"

    def env(self, **extra: str) -> dict[str, str]:
        return _clean_env(PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(self.venv),
                          JAXMOE_CACHE_DIR=str(self.cache), **extra)

    def run(self, *cmd, **extra: str) -> subprocess.CompletedProcess:
        return _check([str(c) for c in cmd], cwd=self.work, env=self.env(**extra))

    def python_json(self, code: str, **extra: str) -> dict:
        """Runs `code` (which prints one JSON line last) in the venv's python."""
        return json.loads(self.run(self.python, "-c", code, **extra).stdout.strip().splitlines()[-1])

    @property
    def site_packages(self) -> Path:
        (sp,) = self.venv.glob("lib/python*/site-packages")
        return sp


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Installed:
    inst = Installed(tmp_path_factory.mktemp("installed"))
    inst.work.mkdir()
    _check([sys.executable, "-m", "venv", "--without-pip", str(inst.venv)])
    # the wheel first, into the bare venv (pip there sees no other jaxmoe), then the dependencies
    _check([sys.executable, "-m", "pip", "--python", str(inst.python), "install", "--no-deps", "--no-index", str(wheel)],
           env=_clean_env())
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (inst.site_packages / "zz_project_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return inst


@pytest.fixture(scope="module")
def checkpoint(installed) -> Path:
    out = installed.work / "tiny-ckpt"
    installed.run(installed.jaxmoe, "synth", "--config", "tiny", "--out", out)
    assert (out / "config.json").is_file()
    return out


def test_wheel_is_tagged_for_its_platform_and_carries_configs_and_the_library(wheel):
    assert wheel.name == f"jaxmoe-0.1.0-py3-none-{PLATFORM_TAG}.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read("jaxmoe-0.1.0.dist-info/WHEEL").decode()
        manifest = json.loads(z.read("jaxmoe/cpu/_native/libjaxmoe_cpu.so.json"))
    assert "Root-Is-Purelib: false" in meta and f"Tag: py3-none-{PLATFORM_TAG}" in meta
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "jaxmoe" / "configs").rglob("*.json")}
    assert {"jaxmoe/configs/models/tiny.json", "jaxmoe/configs/runtime/cpu-only.json",
            "jaxmoe/configs/hardware/this-machine.json"} <= configs
    assert configs <= names, sorted(configs - names)
    native = "jaxmoe/cpu/_native/"
    assert {native + "libjaxmoe_cpu.so", native + "jaxmoe_cpu.h", native + "cpu_ext/build.py",
            native + "cpu_ext/include/jaxmoe_cpu.h"} <= names
    sources = {native + "cpu_ext/src/" + p.name for p in (REPO / "cpu_ext" / "src").iterdir() if p.suffix in (".c", ".cc", ".h")}
    assert sources <= names, sorted(sources - names)
    assert manifest == {"variant": "native", "ffi": True}  # built where jax is importable: with the XLA bindings
    assert not [n for n in names if n.endswith(".so") and n != native + "libjaxmoe_cpu.so"]  # no test variants
    assert {n.split("/")[0] for n in names} == {"jaxmoe", "jaxmoe-0.1.0.dist-info"}  # nothing of the checkout's top level


def test_installed_package_reads_its_own_files_and_the_cache(installed, checkpoint):
    code = """if True:
        import json, sys
        import jaxmoe
        from jaxmoe.config import ModelConfig, named_config_path
        from jaxmoe.cpu import _lib
        from jaxmoe.planning.hardware import calibration_path, load_hardware
        from jaxmoe.serving.presets import RuntimeConfig
        model = jaxmoe.load(sys.argv[1], runtime="cpu-only")
        r = jaxmoe.generate(model, "Hello", max_new_tokens=3)
        print(json.dumps({
            "file": jaxmoe.__file__, "sys_path": sys.path,
            "configs": [str(named_config_path(k, n, k)) for k, n in (("models", "demo"), ("runtime", "cpu-only"),
                                                                     ("hardware", "this-machine"))],
            "demo_layers": ModelConfig.named("demo").num_hidden_layers, "preset": RuntimeConfig.load("cpu-only").preset,
            "calibration": str(calibration_path()), "calibrated_from": list(load_hardware("this-machine").calibrated_from),
            "gemv": load_hardware("this-machine").efficiency.cpu_gemv_frac_of_read,
            "library": str(_lib.library_path()), "cpu_kernels": model.cpu_kernels, "tokens": len(r.token_ids),
        }))
    """
    code = code.replace("sys.argv[1]", repr(str(checkpoint)))
    got = installed.python_json(code)
    site = installed.site_packages
    assert Path(got["file"]).is_relative_to(site) and not Path(got["file"]).is_relative_to(REPO)
    assert str(REPO) not in got["sys_path"] and "" not in got["sys_path"][1:]
    assert all(Path(p).is_relative_to(site / "jaxmoe" / "configs") for p in got["configs"])
    assert got["demo_layers"] > 0 and got["preset"] == "cpu-only"
    assert Path(got["library"]) == site / "jaxmoe" / "cpu" / "_native" / "libjaxmoe_cpu.so"  # the shipped one, no rebuild
    assert got["cpu_kernels"] and got["tokens"] == 3
    cal = installed.cache / "calibration" / "kernels.json"
    assert got["calibration"] == str(cal) and got["calibrated_from"] == [] and got["gemv"] == 0.9  # shipped figures
    # a measured calibration in the user's cache (what `python -m benchmarks.kernels` leaves there)
    cal.parent.mkdir(parents=True, exist_ok=True)
    cal.write_text(json.dumps({"metrics": {"fp8_gemv_m1_frac_of_read": 0.75}}))
    try:
        got = installed.python_json("import json; from jaxmoe.planning.hardware import load_hardware as h; "
                                    "hw = h('this-machine'); print(json.dumps([hw.efficiency.cpu_gemv_frac_of_read, "
                                    "list(hw.calibrated_from)]))")
    finally:
        cal.unlink()
    assert got == [0.75, [f"{cal}: cpu_gemv_frac_of_read"]]


def test_cli_synth_generate_and_demo_outside_the_checkout(installed, checkpoint):
    res = installed.run(installed.jaxmoe, "generate", "--model", checkpoint, "--prompt", "Hello", "--max-new-tokens", "4",
                        "--json")
    got = json.loads(res.stdout)
    assert len(got["token_ids"]) == 4 and got["finish_reason"] == "length"
    res = installed.run(installed.jaxmoe, "demo", "--config", "tiny", "--max-new-tokens", "4", "--cache-dir",
                        installed.work / "demo-cache")
    assert "config 'tiny'" in res.stdout and "finish: length" in res.stdout and "generated tokens 4" in res.stdout
    assert "jaxmoe's CPU kernels" in res.stdout
    res = subprocess.run([str(installed.jaxmoe), "synth", "--config", "no-such-config", "--out", "x"], capture_output=True,
                         text=True, cwd=installed.work, env=installed.env())
    assert res.returncode == 2 and "unknown model config 'no-such-config'; known: ['bench-v3-mid', 'deepseek-v3'" in res.stderr


def test_a_library_without_the_xla_bindings_is_rebuilt_from_the_shipped_sources(installed, checkpoint):
    """What a wheel built in pip's isolated environment (no jax there) carries: the installed package
    rebuilds the library from its own copy of cpu_ext, here into the user cache as if the package
    folder were read-only, and runs the model on it."""
    native = installed.site_packages / "jaxmoe" / "cpu" / "_native"
    manifest = native / "libjaxmoe_cpu.so.json"
    shipped = manifest.read_text()
    manifest.write_text(json.dumps({"variant": "native", "ffi": False}))
    code = """if True:
        import json, os
        real_access = os.access  # the package's _native folder read-only (we run as whoever owns it)
        os.access = lambda p, mode, **kw: (False if mode == os.W_OK and str(p).startswith(NATIVE)
                                           else real_access(p, mode, **kw))
        import jaxmoe
        from jaxmoe.cpu import _lib
        lib = _lib.library_path()
        r = jaxmoe.generate(jaxmoe.load(CKPT, runtime="cpu-only"), "Hello", max_new_tokens=2)
        print(json.dumps({"library": str(lib), "manifest": json.loads(open(str(lib) + ".json").read()),
                          "tokens": len(r.token_ids)}))
    """.replace("NATIVE", repr(str(native))).replace("CKPT", repr(str(checkpoint)))
    try:
        got = installed.python_json(code)
    finally:
        manifest.write_text(shipped)
    lib = Path(got["library"])
    assert lib.name == "libjaxmoe_cpu.so" and lib.parent.parent == installed.cache / "native"
    assert got["manifest"] == {"variant": "native", "ffi": True} and got["tokens"] == 2
