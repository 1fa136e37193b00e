"""The precision contract of the native library (process-wide, like the ISA): `exact` runs f32
numerics on every ISA path; `bf16` runs bf16 dot products only where the selected path has
them (AVX-512 with AVX512_BF16) and stays exact elsewhere; env JAXMOE_CPU_PRECISION at load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxmoe.cpu import _lib


def test_use_and_set_precision_restore_and_refuse_bad_names():
    nat = _lib.load()
    prev = nat.precision()
    assert prev in _lib.PRECISION_NAMES
    for name in _lib.PRECISION_NAMES:
        with nat.use_precision(name):
            assert nat.precision() == name
        assert nat.precision() == prev
    with pytest.raises(ValueError, match="unknown CPU kernel precision 'fp16'"):
        with nat.use_precision("fp16"):
            pass
    with pytest.raises(ValueError, match="precision"):
        nat.set_precision("f32")  # a numerics name, not a precision
    assert nat.precision() == prev


def test_numerics_follow_the_path_that_runs(path_lib):
    """exact: f32 numerics and the ISA's own kernels; bf16 (only where a bf16 dot exists, the
    fixture skips the rest): the avx512-bf16 kernels."""
    isa, precision, nat = path_lib
    assert nat.precision() == precision
    if precision == "exact":
        assert nat.numerics() == "f32" and nat.kernel_path() == isa
    else:
        assert nat.numerics() == "bf16" and nat.kernel_path() == "avx512-bf16"


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_bf16_stays_exact_without_a_bf16_dot(isa):
    nat = _lib.load()
    if isa not in nat.supported_isas():
        pytest.skip(f"no {isa} here")
    with nat.use_isa(isa), nat.use_precision("bf16"):
        assert nat.precision() == "bf16"  # what was asked for
        assert not nat.lib.jm_bf16_dot() and nat.numerics() == "f32" and nat.kernel_path() == isa


@pytest.mark.parametrize("env,want", [(None, "exact"), ("exact", "exact"), ("bf16", "bf16")])
def test_precision_env_var(env, want):
    """JAXMOE_CPU_PRECISION picks the precision at load time; unset: exact."""
    code = "from jaxmoe.cpu import _lib; print(_lib.load().precision())"
    environ = {k: v for k, v in os.environ.items() if k != "JAXMOE_CPU_PRECISION"}
    if env is not None:
        environ["JAXMOE_CPU_PRECISION"] = env
    res = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == want
