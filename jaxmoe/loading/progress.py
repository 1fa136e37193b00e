"""A one-line progress bar on stderr for long loads and writes (no tqdm dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (tensors and bytes), shown once a task passes `delay` s."""

    def __init__(self, total: int, total_bytes: int, *, enabled: bool | None = None, label: str = "",
                 delay: float = 1.0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = 0.0 if enabled else delay
        self.total, self.total_bytes, self.label = total, total_bytes, label
        self.n = self.bytes = 0
        self.t0 = time.monotonic()
        self.last = -1.0
        self.shown = False

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.n += n
        self.bytes += nbytes
        now = time.monotonic() - self.t0
        if self.enabled and now >= self.delay and (now - self.last >= 0.1 or self.n == self.total):
            self.last = now
            self._draw(now)

    def _draw(self, elapsed: float) -> None:
        frac = self.bytes / self.total_bytes if self.total_bytes else self.n / max(self.total, 1)
        bar = "#" * int(30 * frac)
        gb = 1 << 30
        rate = self.bytes / gb / max(elapsed, 1e-9)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {self.n}/{self.total} tensors "
            f"{self.bytes / gb:.2f}/{self.total_bytes / gb:.2f} GiB {rate:.2f} GiB/s {elapsed:.0f}s"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
