"""Hooks the native CPU kernels (cpu_ext/) into `pip install`; everything else is pyproject.toml.

The library is built by cpu_ext/build.py into jaxmoe/cpu/_native/ (editable installs: in the
source tree; wheels: in the build tree, with a copy of the C header and of the cpu_ext sources
in jaxmoe/cpu/_native/cpu_ext/). The XLA FFI bindings need jax's headers: when the build
environment has no jax (pip's isolated builds), the library is built without them and an
installed jaxmoe.cpu rebuilds it from that copy of the sources on first use (jaxmoe/cpu/_lib.py).
A machine without a C compiler still installs; jaxmoe.cpu then reports the missing library
when used.

The wheel carries that native library, so it is not pure: it is tagged for its platform,
`py3-none-<platform>` (e.g. py3-none-linux_x86_64). The library is plain C/C++ loaded with
cffi's dlopen (no CPython extension module, no Python C API) and speaks to XLA through the
versioned XLA FFI C API, so it does not depend on the Python version or ABI: one wheel per
platform, for every CPython >= 3.11 (requires-python).
"""

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
CPU_EXT = ROOT / "cpu_ext"


def _builder():
    spec = importlib.util.spec_from_file_location("_jaxmoe_cpu_build", CPU_EXT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_sources(dst: Path) -> None:
    """cpu_ext's build script, sources and header (what a rebuild needs; no tests) under dst."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(CPU_EXT / "build.py", dst / "build.py")
    for sub in ("src", "include"):
        shutil.copytree(CPU_EXT / sub, dst / sub, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        out = ROOT / "jaxmoe" / "cpu" / "_native" if editable else Path(self.build_lib) / "jaxmoe" / "cpu" / "_native"
        try:
            if not editable:
                _copy_sources(out / "cpu_ext")
                shutil.copyfile(CPU_EXT / "include" / "jaxmoe_cpu.h", out / "jaxmoe_cpu.h")
            lib = _builder().build(out)
            print(f"jaxmoe: built {lib}")
        except Exception as e:  # no compiler (or no cpu_ext/): install anyway, jaxmoe.cpu reports it when used
            print(f"jaxmoe: warning: native CPU kernels not built ({e})", file=sys.stderr)


class NativeDistribution(Distribution):
    """Carries a native library (built by build_py, not as a setuptools Extension): not pure, so
    the files go to platlib (the wheel's root) and the wheel gets a platform tag."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """Tagged py3-none-<platform> (the module docstring says why not cpXY-cpXY)."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=NativeDistribution, cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel})
