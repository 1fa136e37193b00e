"""Hooks the native CPU kernels (cpu_ext/) into `pip install`; everything else is pyproject.toml.

The library is built by cpu_ext/build.py into jaxmoe/cpu/_native/ (editable installs: in the
source tree; wheels: in the build tree, with a copy of the C header). The XLA FFI bindings need
jax's headers: when the build environment has no jax (pip's isolated builds), the library is
built without them and jaxmoe.cpu rebuilds it with them on first use. A machine without a C
compiler still installs; jaxmoe.cpu then reports the missing library when used.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _builder():
    spec = importlib.util.spec_from_file_location("_jaxmoe_cpu_build", ROOT / "cpu_ext" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        out = ROOT / "jaxmoe" / "cpu" / "_native" if editable else Path(self.build_lib) / "jaxmoe" / "cpu" / "_native"
        try:
            lib = _builder().build(out)
            if not editable:
                shutil.copyfile(ROOT / "cpu_ext" / "include" / "jaxmoe_cpu.h", out / "jaxmoe_cpu.h")
            print(f"jaxmoe: built {lib}")
        except Exception as e:  # no compiler: install anyway, jaxmoe.cpu reports it when used
            print(f"jaxmoe: warning: native CPU kernels not built ({e})", file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithNative})
