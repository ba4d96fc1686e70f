"""A one-line progress display for long jobs on a terminal (no dependency).

`Progress(total, label)` draws `label: 1,234,567/10,000,000 rows (12%), 45,678
rows/s, 3m 12s left` on stderr with `\\r`, at most every `interval` seconds,
and only when stderr is a terminal and the job has run for `delay` seconds
(short jobs and redirected output show nothing). `close()` wipes the line.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "is_terminal"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a replaced or closed stream)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Rows done out of `total` (None: unknown), drawn on `stream` (default stderr)."""

    def __init__(self, total: "int | None", label: str, stream=None, enabled: bool = True,
                 delay: float = 1.0, interval: float = 0.25):
        self.total, self.label = total, label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and is_terminal(self.stream)
        self.delay, self.interval = delay, interval
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0

    def update(self, done: int) -> None:
        """Reports `done` rows so far."""
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        if elapsed < self.delay or now - self._last < self.interval:
            return
        self._last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {done:,}"
        if self.total:
            text += f"/{self.total:,} rows ({100 * done / self.total:.0f}%)"
        else:
            text += " rows"
        text += f", {rate:,.0f} rows/s"
        if self.total and rate > 0:
            text += f", {_duration((self.total - done) / rate)} left"
        self._draw(text)

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        """Wipes the line, if one was drawn."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
