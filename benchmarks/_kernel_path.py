"""Which FP8/BF16 kernel path a measurement ran on, and the `--precision` choice.

The native library's precision (`jm_set_precision`: 0 exact, 1 bf16) and the path it selects
(`jm_kernel_path`: "scalar", "avx2", "avx512", "avx512-bf16") are process-wide. A library
built before those entry points existed has neither: cffi raises AttributeError when such a
symbol is called, and then the path is reported as the ISA name, the precision as None
("the library's only one"), and only that one precision is measured.

Rows measured at a precision other than exact carry the suffix `_<precision>` in their
metric and detail keys (`suffix`); exact rows (and rows of a library without a precision
switch) keep the plain keys, so older readers of the results keep working.
"""

from __future__ import annotations

import argparse
import contextlib

PRECISIONS = {"exact": 0, "bf16": 1}
CHOICES = ("exact", "bf16", "both")


def add_precision_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--precision", choices=CHOICES, default=None,
                    help="FP8 kernel precision(s) to measure, back to back (default: both where the CPU has a "
                         "bf16 dot product, else exact)")


def _call(lib, name: str, *args):
    """lib.<name>(*args), or None when the library lacks the symbol."""
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return None
    return fn(*args)


def has_precision(nat) -> bool:
    """True when the library can switch precision (jm_set_precision / jm_precision exist)."""
    return _call(nat.lib, "jm_precision") is not None


def kernel_info(nat) -> dict:
    """{"isa", "precision", "bf16_dot", "kernel_path"} of the FP8/BF16 kernels in use now.
    precision: "exact" | "bf16" | None (no precision switch); bf16_dot: bool | None."""
    lib = nat.lib
    prec = _call(lib, "jm_precision")
    dot = _call(lib, "jm_bf16_dot")
    path = _call(lib, "jm_kernel_path")
    isa = nat.selected_isa()
    return {"isa": isa,
            "precision": None if prec is None else {v: k for k, v in PRECISIONS.items()}.get(int(prec), str(prec)),
            "bf16_dot": None if dot is None else bool(dot),
            "kernel_path": isa if path is None else nat.ffi.string(path).decode()}


@contextlib.contextmanager
def precision(nat, name: str | None):
    """Runs the block at precision `name` ("exact" | "bf16"), restoring the previous one after;
    None (or a library without the switch) leaves the precision as it is."""
    prev = _call(nat.lib, "jm_precision")
    if name is None or prev is None:
        yield
        return
    nat.check(_call(nat.lib, "jm_set_precision", PRECISIONS[name]) or 0)
    try:
        yield
    finally:
        _call(nat.lib, "jm_set_precision", int(prev))


def bf16_dot_available(nat) -> bool:
    """True when, at precision bf16, the selected path runs bf16 dot products."""
    if not has_precision(nat):
        return False
    with precision(nat, "bf16"):
        return bool(_call(nat.lib, "jm_bf16_dot"))


def precisions(nat, choice: str | None) -> list[str | None]:
    """The precisions to measure, in order: `choice` "exact" / "bf16" / "both" as asked; None:
    both where the CPU has a bf16 dot, else exact. A library without the switch: [None]."""
    if not has_precision(nat):
        return [None]
    if choice is None:
        choice = "both" if bf16_dot_available(nat) else "exact"
    return ["exact", "bf16"] if choice == "both" else [choice]


def suffix(prec: str | None) -> str:
    """"" for exact (and for None), "_<prec>" otherwise: the key suffix of a precision's rows."""
    return "" if prec in (None, "exact") else f"_{prec}"


def suffixed(d: dict, prec: str | None) -> dict:
    """d with every key suffixed for `prec`."""
    s = suffix(prec)
    return {f"{k}{s}": v for k, v in d.items()}
