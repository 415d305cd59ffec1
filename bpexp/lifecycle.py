"""SIGTERM as Ctrl-C, for a run and for a sweep's launching process alike; whether a process lives.

scancel, kill and a launcher's shutdown send SIGTERM; unwinding it as a KeyboardInterrupt lets the
`finally` blocks close the run (KILLED) or the sweep, so nothing is left RUNNING in the store.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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


def process_alive(pid: int, started_by_ms: int | None = None) -> bool:
    """Whether process `pid` of this host runs (a zombie does not), and, where /proc tells, started by
    `started_by_ms` (epoch ms): a pid the system gave again to a later process is not the one sought."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration):
        return True  # no /proc (macOS): the pid is all there is
    if fields[0] == "Z":
        return False
    started_ms = (boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")) * 1000
    return started_by_ms is None or started_ms <= started_by_ms + 2000  # btime is whole seconds
