"""A progress bar on stderr for long loads and writes (no tqdm dependency).

enabled=None (auto): on a terminal, a one-line bar redrawn in place once a task passes
`delay` s; elsewhere (a log, a pipe), a plain line every `log_every` s once the task has run
that long, so short loads stay silent and long ones say how far they are. Each draw shows the
rate (GiB/s over the whole task so far) and the estimated time left at that rate.
"""

from __future__ import annotations

import sys
import time


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of a task over tensors and bytes, drawn on stderr (see module doc)."""

    def __init__(self, total: int, total_bytes: int, *, enabled: bool | None = None, label: str = "",
                 delay: float = 1.0, stream=None, log_every: float = 10.0):
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = True if enabled is None else bool(enabled)
        self.inline = tty or bool(enabled)  # redraw one line; else a line per `log_every` s
        self.delay = 0.0 if enabled else delay if tty else log_every
        self.period = 0.1 if self.inline else log_every
        self.total, self.total_bytes, self.label = total, total_bytes, label
        self.n = self.bytes = 0
        self.t0 = time.monotonic()
        self.last = -1e9
        self.shown = False

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.n += n
        self.bytes += nbytes
        now = time.monotonic() - self.t0
        if self.enabled and now >= self.delay and (now - self.last >= self.period or self.n == self.total):
            self.last = now
            self._draw(now)

    def line(self, elapsed: float) -> str:
        """The text of one draw."""
        frac = self.bytes / self.total_bytes if self.total_bytes else self.n / max(self.total, 1)
        frac = min(max(frac, 0.0), 1.0)
        gb = 1 << 30
        rate = self.bytes / gb / max(elapsed, 1e-9)
        eta = f"eta {_duration(elapsed * (1 - frac) / frac)}" if 0 < frac < 1 else "done" if frac >= 1 else "eta ?"
        return (f"{self.label} [{'#' * int(30 * frac):<30}] {self.n}/{self.total} tensors "
                f"{self.bytes / gb:.2f}/{self.total_bytes / gb:.2f} GiB {rate:.2f} GiB/s "
                f"{_duration(elapsed)} {eta}")

    def _draw(self, elapsed: float) -> None:
        text = self.line(elapsed)
        if self.inline:
            self.stream.write(f"\r{text}\x1b[K" if self._tty() else f"\r{text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = True

    def _tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def close(self) -> None:
        if self.shown and self.inline:
            self.stream.write("\n")
            self.stream.flush()
