"""Progress on long work: a live bar on a terminal, a few plain lines anywhere else.

On a terminal the bar redraws in place at most `fps` times a second. Into a pipe or a file (CI, SLURM
logs, joblib workers) it writes one plain line at each quarter of the work, and at most one line every
`interval` seconds in between, so a log file never floods.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        fps: float = 8.0,
        interval: float = 30.0,
        unit: str = "step",
    ):
        self.total, self.label, self.unit = max(total, 1), label, unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.min_gap = 1.0 / fps if self.live else interval
        self.start = time.monotonic()
        self.last_draw = -float("inf")
        self.next_quarter = 1
        self.fields: dict[str, str] = {}
        self.done = 0
        self.width = 0
        self.drawn: tuple[int, dict[str, str]] | None = None

    def update(self, done: int, **fields: str) -> None:
        """`done` units finished; `fields` (e.g. loss='0.42') are shown after the bar until replaced."""
        self.done = done
        self.fields.update(fields)
        now = time.monotonic()
        quarter = done * 4 >= self.next_quarter * self.total
        if quarter:
            self.next_quarter = done * 4 // self.total + 1
        if now - self.last_draw >= self.min_gap or (quarter and not self.live):
            self.draw(now)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        share = min(self.done / self.total, 1.0)
        fields = "  ".join(f"{k} {v}".strip() for k, v in self.fields.items())
        counts = f"{self.done}/{self.total} {self.unit}s, {rate:.0f}/s, {duration(elapsed)} < {duration(eta)}"
        if not self.live:
            return f"{self.label}: {share:4.0%} {counts}  {fields}".rstrip()
        bar = "█" * int(20 * share) + "·" * (20 - int(20 * share))
        return f"{self.label} {bar} {share:4.0%} {counts}  {fields}".rstrip()

    def draw(self, now: float) -> None:
        self.last_draw = now
        self.drawn = (self.done, dict(self.fields))
        text = self.line(now)
        if self.live:
            pad = max(self.width - len(text), 0)
            self.width = len(text)
            self.stream.write("\r" + text + " " * pad)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (once); on a terminal, end the line so the next output starts clean."""
        if self.drawn != (self.done, self.fields):
            self.draw(time.monotonic())
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
