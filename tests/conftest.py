"""Suite-wide set-up: fake CPU devices for the multi-device tests (placement presets, expert
parallelism). This must run before JAX creates its backends, hence here, first.

The user's jaxmoe cache ($JAXMOE_CACHE_DIR, ~/.cache/jaxmoe) is out of the tests' reach: they
(and the processes they start) see an empty temporary one and no $JAXMOE_CALIBRATION, so a
calibration measured on this box never changes a prediction under test."""

import os
import tempfile

import jax

N_CPU_DEVICES = 4
jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)

_CACHE = tempfile.TemporaryDirectory(prefix="jaxmoe-test-cache-")  # removed when the session ends
os.environ["JAXMOE_CACHE_DIR"] = _CACHE.name
os.environ.pop("JAXMOE_CALIBRATION", None)
