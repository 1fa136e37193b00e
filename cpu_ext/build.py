"""Builds cpu_ext into one shared library (C kernels + the C++17 XLA FFI bindings).

Each ISA file gets its own -m flags (`*_avx2.c`: AVX2/FMA/F16C, `*_avx512.c`: AVX-512
F/BW/VL, `*_avx512bf16.c`: AVX-512 F/BW/VL/BF16) and everything else is plain x86-64, so the library builds and loads on any
x86-64 machine; the path is chosen at run time (src/dispatch.c). No jax at build time is
needed for the C part; `ffi.cc` is compiled when the XLA FFI headers are found
(`jax.ffi.include_dir()`), else the library is built without the XLA handlers.

Variants:
  native  the library jaxmoe loads.
  emu512  tests only: the AVX-512 file compiled against SIMDe's portable AVX-512 (Debian
          `libsimde-dev` or PyPI `simde-py`), so that path's layout and algebra are checked
          on machines without AVX-512.

    python cpu_ext/build.py [--out DIR] [--variant native|emu512] [--force]
    python cpu_ext/build.py --harness EXE [--variant ...] [--sanitize]   # C test harness
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
INCLUDE = ROOT / "include"
DEFAULT_OUT = ROOT.parent / "jaxmoe" / "cpu" / "_native"
LIB_NAMES = {"native": "libjaxmoe_cpu.so", "emu512": "libjaxmoe_cpu_emu512.so"}

CC = os.environ.get("CC", "gcc")
CXX = os.environ.get("CXX", "g++")
BASE = ["-O2", "-g", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{INCLUDE}", f"-I{SRC}",
        *os.environ.get("JAXMOE_CPU_CFLAGS", "").split()]  # extra flags, e.g. -DJM_PF_DIST=8192
# C only (g++ has no -Wmissing-prototypes): every external function is declared in a header
# (include/jaxmoe_cpu.h for the ABI, internal.h / int4.h / store.h / moe.h inside), so a
# definition and its callers cannot drift apart; a function without one is static.
CFLAGS = ["-std=gnu11", "-pthread", "-Wmissing-prototypes", "-Werror=missing-prototypes"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"],
    "avx512bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
}
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def sources() -> list[Path]:
    return sorted(p for p in SRC.iterdir() if p.suffix in (".c", ".cc", ".h")) + [INCLUDE / "jaxmoe_cpu.h", Path(__file__)]


def ffi_include_dir() -> str | None:
    try:
        import jax.ffi  # noqa: PLC0415

        inc = jax.ffi.include_dir()
    except Exception:  # jax missing or too old: build without the XLA handlers
        return None
    return inc if (Path(inc) / "xla" / "ffi" / "api" / "ffi.h").exists() else None


def simde_include_dir() -> str | None:
    for cand in ("/usr/include", "/usr/local/include"):
        if (Path(cand) / "simde" / "x86" / "avx512.h").exists():
            return cand
    spec = importlib.util.find_spec("simde_py")  # PyPI simde-py (the [test] extra): simde_py/simde/simde/x86/...
    if spec and spec.origin:
        inc = Path(spec.origin).resolve().parent / "simde"
        if (inc / "simde" / "x86" / "avx512.h").exists():
            return str(inc)
    return None


def compile_commands(obj_dir: Path, variant: str, ffi_inc: str | None, sanitize: bool, extra_sources=()) -> list[list[str]]:
    """One compiler command per source; ffi.cc only when ffi_inc is given."""
    extra = SANITIZE if sanitize else []
    cmds = []
    for src in [*sorted(SRC.iterdir()), *extra_sources]:
        obj = str(obj_dir / (src.name + ".o"))
        if src.suffix == ".cc":
            if ffi_inc is None:
                continue
            cmds.append([CXX, "-std=c++17", *BASE, *extra, f"-isystem{ffi_inc}", "-c", str(src), "-o", obj])
        elif src.suffix == ".c":
            flags = [*BASE, *CFLAGS, *extra]
            isa = src.stem.rsplit("_", 1)[-1]
            if isa in ISA_FLAGS:
                if variant == "emu512" and isa.startswith("avx512"):
                    inc = simde_include_dir()
                    if inc is None:
                        raise RuntimeError("emu512 build needs SIMDe headers (apt libsimde-dev or pip simde-py)")
                    flags += [*ISA_FLAGS["avx2"], "-DJM_SIMDE", f"-isystem{inc}", "-Wno-unused-function",
                              "-Wno-psabi"]  # SIMDe's 64-byte vectors in static functions: no ABI to keep
                else:
                    flags += ISA_FLAGS[isa]
            if variant == "emu512" and src.stem == "dispatch":
                flags.append("-DJM_AVX512_EMULATED")
            cmds.append([CC, *flags, "-c", str(src), "-o", obj])
    return cmds


def _compile_all(cmds: list[list[str]], verbose: bool) -> None:
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds))
    for cmd, res in zip(cmds, results):
        if verbose or res.returncode:
            sys.stderr.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
        if res.returncode:
            raise RuntimeError(f"cpu_ext build failed compiling {cmd[-3]}:\n{res.stderr}")


def _link(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"cpu_ext link failed:\n{res.stderr}")


def build(out_dir: Path | str = DEFAULT_OUT, variant: str = "native", verbose: bool = False) -> Path:
    """Compiles and links; the library appears atomically at out_dir/<name> with a manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ffi_inc = ffi_include_dir()
    with tempfile.TemporaryDirectory(prefix="jaxmoe_build_", dir=out_dir) as tmp:
        tmp = Path(tmp)
        cmds = compile_commands(tmp, variant, ffi_inc, sanitize=False)
        _compile_all(cmds, verbose)
        lib = tmp / LIB_NAMES[variant]
        _link([CXX, "-shared", "-pthread", "-o", str(lib), *(c[-1] for c in cmds)])
        (tmp / "manifest.json").write_text(json.dumps({"variant": variant, "ffi": ffi_inc is not None}))
        os.replace(lib, out_dir / lib.name)
        shutil.copyfile(tmp / "manifest.json", out_dir / (lib.name + ".json"))
    return out_dir / LIB_NAMES[variant]


def harness(exe: Path | str, variant: str = "native", sanitize: bool = True, verbose: bool = False) -> Path:
    """The C test harness (cpu_ext/tests/*.c + every C source, no XLA bindings) as one
    executable, by default under AddressSanitizer + UndefinedBehaviorSanitizer."""
    exe = Path(exe)
    exe.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxmoe_harness_") as tmp:
        cmds = compile_commands(Path(tmp), variant, None, sanitize, sorted((ROOT / "tests").glob("*.c")))
        _compile_all(cmds, verbose)
        _link([CC, "-pthread", *(SANITIZE if sanitize else []), "-o", str(exe), *(c[-1] for c in cmds), "-lm"])
    return exe


def is_stale(lib: Path) -> bool:
    """True if the library is missing or older than any source, header or this builder."""
    if not lib.exists():
        return True
    if not SRC.exists():  # installed without sources: use what is there
        return False
    t = lib.stat().st_mtime
    return any(p.stat().st_mtime > t for p in sources())


def manifest(lib: Path) -> dict:
    try:
        return json.loads(Path(str(lib) + ".json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--variant", choices=sorted(LIB_NAMES), default="native")
    ap.add_argument("--harness", metavar="EXE", help="build the C test harness executable instead")
    ap.add_argument("--sanitize", action="store_true", help="harness under ASan + UBSan")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.harness:
        print(f"built {harness(args.harness, args.variant, args.sanitize, args.verbose)}")
        return 0
    lib = Path(args.out) / LIB_NAMES[args.variant]
    if args.force or is_stale(lib):
        lib = build(args.out, args.variant, args.verbose)
        print(f"built {lib} ({manifest(lib)})")
    else:
        print(f"{lib} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
