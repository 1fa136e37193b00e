"""Which FP8/BF16 kernel path a measurement ran on, and the `--precision` choice.

The native library's precision and the kernel path it selects are process-wide; this module
reads and sets them through jaxmoe.cpu._lib.Native (`precision`, `use_precision`, `numerics`,
`kernel_path`). Rows measured at a precision other than exact carry the suffix `_<precision>`
in their metric and detail keys (`suffix`); exact rows keep the plain keys, so a reader that
knows only those reads the exact figures unchanged.
"""

from __future__ import annotations

import argparse
import contextlib

CHOICES = ("exact", "bf16", "both")


def add_precision_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--precision", choices=CHOICES, default=None,
                    help="FP8 kernel precision(s) to measure, back to back (default: both where the CPU has a "
                         "bf16 dot product, else exact)")


def kernel_info(nat) -> dict:
    """{"isa", "precision", "bf16_dot", "kernel_path"} of the FP8/BF16 kernels in use now."""
    return {"isa": nat.selected_isa(), "precision": nat.precision(), "bf16_dot": nat.numerics() == "bf16",
            "kernel_path": nat.kernel_path()}


def precision(nat, name: str | None):
    """Runs the block at precision `name` ("exact" | "bf16"), restoring the previous one after;
    None leaves the precision as it is."""
    return contextlib.nullcontext() if name is None else nat.use_precision(name)


def bf16_dot_available(nat) -> bool:
    """True when, at precision bf16, the selected path runs bf16 dot products."""
    with nat.use_precision("bf16"):
        return nat.numerics() == "bf16"


def precisions(nat, choice: str | None) -> list[str]:
    """The precisions to measure, in order: `choice` "exact" / "bf16" / "both" as asked; None:
    both where the CPU has a bf16 dot, else exact."""
    if choice is None:
        choice = "both" if bf16_dot_available(nat) else "exact"
    return ["exact", "bf16"] if choice == "both" else [choice]


def suffix(prec: str | None) -> str:
    """"" for exact (and for None: the precision left as it is), "_<prec>" otherwise: the key
    suffix of a precision's rows."""
    return "" if prec in (None, "exact") else f"_{prec}"


def suffixed(d: dict, prec: str | None) -> dict:
    """d with every key suffixed for `prec`."""
    s = suffix(prec)
    return {f"{k}{s}": v for k, v in d.items()}
