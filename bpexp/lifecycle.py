"""SIGTERM as Ctrl-C, for a run and for a sweep's launching process alike.

scancel, kill and a launcher's shutdown send SIGTERM; unwinding it as a KeyboardInterrupt lets the
`finally` blocks close the run (KILLED) or the sweep, so nothing is left RUNNING in the store.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt(on_signal: Callable[[], None] | None = None) -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt (after `on_signal`); the previous handler
    returns at its end. Off the main thread (signals reach only that one) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        if on_signal is not None:
            on_signal()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
