"""Suite-wide set-up: fake CPU devices for the multi-device tests (placement presets, expert
parallelism). This must run before JAX creates its backends, hence here, first.

The user's jaxmoe cache ($JAXMOE_CACHE_DIR, ~/.cache/jaxmoe) is out of the tests' reach: they
(and the processes they start) see an empty temporary one and no $JAXMOE_CALIBRATION, so a
calibration measured on this box never changes a prediction under test. The packed-weights
cache is off unless a test asks for it ($JAXMOE_WEIGHTS_CACHE=off): a load under test packs the
checkpoint it names rather than mapping what an earlier test wrote."""

import gc
import os
import tempfile

import jax
import pytest

# XLA compiles the tests' programs with LLVM's optimisations off: compiling is most of an engine
# test, and this cuts the suite's time by a third (17:19 -> 11:38 on 2 cores). The programs
# compute the same functions, but rounding may differ (at -O0 LLVM fuses no multiply-add into
# an FMA, for one), so a logit may differ in its last bits from a program compiled at the
# default level (tiny model: max 5.7e-6, the same greedy tokens). Every comparison in the suite
# is between programs compiled here or against a reference within its own tolerance. Users'
# programs keep XLA's defaults. The processes the tests start inherit the flags; the caller's
# own $XLA_FLAGS come last and win.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

N_CPU_DEVICES = 4
jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)

_CACHE = tempfile.TemporaryDirectory(prefix="jaxmoe-test-cache-")  # removed when the session ends
os.environ["JAXMOE_CACHE_DIR"] = _CACHE.name
os.environ.pop("JAXMOE_CALIBRATION", None)
os.environ["JAXMOE_WEIGHTS_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module: drop JAX's compiled programs. Every loaded model's step programs
    compile anew (its host handles are static arguments) and each executable keeps its code
    mmaps until the caches are cleared; over the whole suite they would pass the kernel's
    vm.max_map_count (65530), and the next compilation would fail inside LLVM."""
    yield
    jax.clear_caches()
    gc.collect()
