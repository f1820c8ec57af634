"""A dependency-free progress bar on stderr: tensors, bytes, throughput and ETA.

Shown only on an interactive terminal and never under CI (``CI`` set) or with ``quiet``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """Callable passed to the core as ``progress(done_bytes, total_bytes, done_tensors, total_tensors)``."""

    def __init__(self, label: str = "", stream: Optional[TextIO] = None, enabled: Optional[bool] = None) -> None:
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)()) and not os.environ.get("CI")
        self.enabled = enabled
        self.label = label
        self.start = time.monotonic()
        self._drawn = False

    def __call__(self, done_bytes: int, total_bytes: int, done_tensors: int, total_tensors: int) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = done_bytes / total_bytes if total_bytes else 0.0
        rate = done_bytes / elapsed
        eta = (total_bytes - done_bytes) / rate if rate > 0 else float("nan")
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        line = (
            f"\r{self.label}[{bar}] {frac * 100:5.1f}%  {done_tensors}/{total_tensors} tensors  "
            f"{_fmt_bytes(done_bytes)}/{_fmt_bytes(total_bytes)}  {_fmt_bytes(rate)}/s  "
            f"ETA {_fmt_time(eta) if eta == eta else '?'}\x1b[K"  # clear what a longer line left
        )
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
