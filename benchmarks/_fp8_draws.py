"""FP8 e4m3 weights for the kernel benchmarks, and the distribution of their codes.

`checkpoint_like` draws a weight the way checkpoints are made (and `jaxmoe synth` writes them):
Gaussian values quantized with 128x128 block scales by `jaxmoe.quant.quantize_fp8_blocks`
(scale = block amax / 448). Such a matrix holds ~0.01 % subnormal codes. `uniform_codes`
draws every non-NaN code equally often (6 % subnormal or zero): a subnormal-heavy matrix, the
case where CPUs that take a microcode assist per denormal FMA slow down by an order of
magnitude. Kernel speed depends on the codes only through such arithmetic cases, so the
benchmarks measure the first and keep one row of the second, named so.

Code classes (e4m3: sign, 4 exponent bits, 3 mantissa bits): zero = +-0 (0x00, 0x80);
subnormal = exponent 0 and mantissa != 0 (14 codes).
"""

from __future__ import annotations

import numpy as np

DRAWS = ("checkpoint_like", "uniform_codes")


def checkpoint_like(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 codes uint8 [n, k], f32 scale_inv [ceil(n/128), ceil(k/128)]) of a N(0, 1/k) weight."""
    from jaxmoe.quant import quantize_fp8_blocks  # noqa: PLC0415

    w = rng.standard_normal((n, k), dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt(k))
    q, s = quantize_fp8_blocks(w, (128, 128))
    return q.view(np.uint8), s


def uniform_codes(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales): every code but the NaNs (0x7f, 0xff) about equally likely; scales
    ~1e-3 x U(0.5, 2) per 128x128 block."""
    q = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] ^= 1  # no NaN codes, as in a checkpoint
    s = (rng.uniform(0.5, 2.0, size=(-(-n // 128), -(-k // 128))) * 1e-3).astype(np.float32)
    return q, s


def draw(name: str, rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The draw called `name` (one of DRAWS)."""
    if name not in DRAWS:
        raise ValueError(f"unknown FP8 draw {name!r}; one of {DRAWS}")
    return (checkpoint_like if name == "checkpoint_like" else uniform_codes)(rng, n, k)


class CodeStats:
    """Counts of zero and subnormal codes over the matrices `add`ed; `as_dict()` gives
    {"codes", "subnormal_frac", "zero_frac"}."""

    def __init__(self) -> None:
        self.codes = self.subnormal = self.zero = 0

    def add(self, codes: np.ndarray) -> None:
        c = np.asarray(codes).view(np.uint8)
        mag = c & 0x7F
        zero = int(np.count_nonzero(mag == 0))
        self.zero += zero
        self.subnormal += int(np.count_nonzero(mag < 0x08)) - zero
        self.codes += c.size

    def as_dict(self) -> dict:
        n = max(self.codes, 1)
        return {"codes": self.codes, "subnormal_frac": self.subnormal / n, "zero_frac": self.zero / n}
