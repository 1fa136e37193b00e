"""Suite-wide set-up: fake CPU devices for the multi-device tests (placement presets, expert
parallelism). This must run before JAX creates its backends, hence here, first."""

import jax

N_CPU_DEVICES = 4
jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)
