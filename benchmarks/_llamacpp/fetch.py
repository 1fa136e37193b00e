"""Obtain llama.cpp from the llama-cpp-python sdist and build llama-bench with cmake, once,
under the cache directory ($JAXMOE_LLAMACPP_CACHE, default ~/.cache/jaxmoe/llamacpp):

    <cache>/sdist/llama_cpp_python-X.tar.gz   pip download --no-binary :all: --no-deps
    <cache>/src/llama_cpp_python-X/vendor/llama.cpp
    <cache>/build/bin/llama-bench             cmake, flags of DESIGN.md section 4
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
TARGET = "llama-bench"


class PeerUnavailable(RuntimeError):
    """llama.cpp cannot be had here (no cached build and fetching/building not allowed or failed)."""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXMOE_LLAMACPP_CACHE") or Path.home() / ".cache" / "jaxmoe" / "llamacpp")


def download_cmd(dest: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python", "-d", str(dest)]


def configure_cmd(src: Path, build: Path) -> list[str]:
    return ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS]


def build_cmd(build: Path, jobs: int | None = None) -> list[str]:
    return ["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs or os.cpu_count() or 1)]


def sdist(cache: Path) -> Path | None:
    found = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    return found[-1] if found else None


def source_dir(cache: Path) -> Path | None:
    """The vendored llama.cpp tree of the unpacked sdist (None if not unpacked)."""
    found = sorted(p for p in (cache / "src").glob("llama_cpp_python-*/vendor/llama.cpp") if (p / "CMakeLists.txt").is_file())
    return found[-1] if found else None


def binary(cache: Path) -> Path | None:
    p = cache / "build" / "bin" / TARGET
    return p if p.is_file() and os.access(p, os.X_OK) else None


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if r.returncode:
        raise PeerUnavailable(f"`{' '.join(cmd[:4])} ...` failed (exit {r.returncode}); see {log}")


def fetch_source(cache: Path, allow_network: bool) -> Path:
    """The llama.cpp source tree, downloading and unpacking the sdist if needed."""
    src = source_dir(cache)
    if src is not None:
        return src
    tgz = sdist(cache)
    if tgz is None:
        if not allow_network:
            raise PeerUnavailable(f"no llama-cpp-python sdist in {cache / 'sdist'} and network fetching is off")
        (cache / "sdist").mkdir(parents=True, exist_ok=True)
        _run(download_cmd(cache / "sdist"), cache / "fetch.log")
        tgz = sdist(cache)
        if tgz is None:
            raise PeerUnavailable(f"pip download left no llama_cpp_python-*.tar.gz in {cache / 'sdist'}")
    (cache / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(cache / "src", filter="data")
    src = source_dir(cache)
    if src is None:
        raise PeerUnavailable(f"{tgz.name} holds no vendor/llama.cpp")
    return src


def ensure_llama_bench(cache: Path, *, allow_network: bool, allow_build: bool) -> Path:
    """Path of a built llama-bench: the cached one, else fetched and built (~6+ min on 2 cores)."""
    b = binary(cache)
    if b is not None:
        return b
    if not allow_build:
        raise PeerUnavailable(f"no built {TARGET} under {cache / 'build'} (building is off in this mode)")
    src = fetch_source(cache, allow_network)
    log = cache / "build.log"
    _run(configure_cmd(src, cache / "build"), log)
    _run(build_cmd(cache / "build"), log)
    b = binary(cache)
    if b is None:
        raise PeerUnavailable(f"the build finished but {cache / 'build/bin' / TARGET} is missing; see {log}")
    return b
