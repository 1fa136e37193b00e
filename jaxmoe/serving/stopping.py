"""Stop strings over streamed text.

`StopMatcher.feed(delta)` returns the text that is safe to emit: it holds back the longest
tail that could still grow into a stop string, and on a match it returns the text before
the stop string that completes first and reports the stop. The stop string itself is never
emitted, so the joined stream equals the final text exactly.
"""

from __future__ import annotations

from collections.abc import Sequence


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (None -> no stop strings)."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got an item {s!r}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return items


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._held = ""  # text received but not yet emitted
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add newly decoded text; return what may be emitted now."""
        if self.stopped:
            return ""
        text = self._held + delta
        if not self.stops:
            self._held = ""
            return text
        # The stop string that completes first wins, as if the text came one character at a
        # time (so the result does not depend on how the text was chunked).
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)[1]]
        keep = max((self._partial(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of stream: the held-back tail was not a stop string after all."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
