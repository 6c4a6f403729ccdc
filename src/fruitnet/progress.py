"""Progress that suits where it goes: tqdm bars on a terminal, plain lines in a log file or a pipe.

A tqdm bar redraws itself with carriage returns; written to a file it becomes one enormous line.
So `bar()` returns tqdm's bar when stderr is a terminal, and otherwise a `Lines` reporter that
writes one whole line every FRUITNET_PROGRESS_SECONDS (default 10) seconds, and a last one when
it finishes if it wrote any: a task shorter than that leaves the log alone.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from fruitnet.outputs import printable

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]"


def interval() -> float:
    """Seconds between two lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("FRUITNET_PROGRESS_SECONDS", 10)))
    except ValueError:
        return 10.0


class Lines:
    """tqdm's interface as far as fruitnet uses it (iterate, update, with-block, close), in lines."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 file=None, every: float | None = None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file = file or sys.stderr
        self.every = interval() if every is None else every
        self.n, self.start = 0, time.monotonic()
        self.last_line, self.written_n = self.start, None

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self._line(now)

    def close(self) -> None:
        if self.written_n is not None and self.written_n != self.n:
            self._line(time.monotonic())
        self.written_n = self.n

    def _line(self, now: float) -> None:
        fmt = LINE_FORMAT if self.total else LINE_FORMAT_NO_TOTAL
        self.file.write(tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                          bar_format=fmt.replace("{desc}", self.desc)) + "\n")
        self.file.flush()
        self.last_line, self.written_n = now, self.n


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False):
    """A progress reporter for `iterable` (or for `update(n)` calls up to `total`), on stderr:
    a transient tqdm bar with rate and ETA on a terminal, plain lines otherwise."""
    desc = printable(desc)  # it may name a folder
    if disable or sys.stderr.isatty():  # tqdm(disable=True) passes the iterable through
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                    disable=disable)
    return Lines(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)
