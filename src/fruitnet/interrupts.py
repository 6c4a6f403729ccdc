"""Ctrl-C during a long job, told apart from a failure wherever it lands.

Python turns SIGINT into KeyboardInterrupt at whatever line is running.  Some libraries turn that
into another error: an import interrupted halfway raises ImportError ("initialization failed"),
so a Ctrl-C during matplotlib's first import ended training with a traceback instead of the
resume hint.  `Interrupts` records that the signal came, so the job can say "interrupted" and
exit 130 whatever exception the KeyboardInterrupt became on its way up.
"""

from __future__ import annotations

import signal
import threading


class Interrupts:
    """With-block: while inside, SIGINT sets `seen` and raises KeyboardInterrupt as usual.
    Outside the main thread (where handlers cannot be installed) only `caused` by the exception itself."""

    def __init__(self):
        self.seen = False
        self._previous = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def caused(self, exc: BaseException) -> bool:
        """Whether `exc` is, or was caused by, a Ctrl-C."""
        return self.seen or isinstance(exc, KeyboardInterrupt)
