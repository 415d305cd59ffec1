"""SIGTERM as Ctrl-C, for a run and for a sweep's launching process alike; whether a process lives.

scancel, kill and a launcher's shutdown send SIGTERM; unwinding it as a KeyboardInterrupt lets the
`finally` blocks close the run (KILLED) or the sweep, so nothing is left RUNNING in the store.
Inside a SLURM job SIGUSR2 unwinds the same way: submitit asks SLURM for it `signal_delay_s` before the
job's time limit (sbatch --signal=USR2@…), so the run ends KILLED while there is time to write it.
`kill_reason` says which of these stopped a run, asking SLURM what it did to the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
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
        for each in signals:  # once: SLURM may signal twice (srun and slurmstepd), and a second
            signal.signal(each, signal.SIG_IGN)  # interrupt would cut the run's closing short
        if on_signal is not None:
            on_signal()
        raise KeyboardInterrupt(f"signal {signum}")

    signals = [signal.SIGTERM, signal.SIGUSR2] if slurm_job() else [signal.SIGTERM]
    previous = {signum: signal.signal(signum, interrupt) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def slurm_job() -> str | None:
    """This process's SLURM job as squeue and scancel name it (`12_3`: task 3 of array 12), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def kill_reason(interrupt: KeyboardInterrupt) -> str:
    """What stopped a run: `Ctrl-C`, `SIGTERM`, or in a SLURM job what SLURM says it did
    (`SLURM job 12_3 TIMEOUT (SIGTERM)`, `SLURM job 12_3: time limit near (SIGUSR2; …)`)."""
    text = str(interrupt)
    if not text.startswith("signal "):
        return "Ctrl-C"
    signum = signal.Signals(int(text.split()[1]))
    job = slurm_job()
    if job is None:
        return signum.name
    if signum == signal.SIGUSR2:
        return f"SLURM job {job}: time limit near ({signum.name}; hydra.launcher.timeout_min, signal_delay_s)"
    fields = slurm_fields(os.environ["SLURM_JOB_ID"])
    state, reason = fields.get("JobState"), fields.get("Reason", "None")
    if state and not state.startswith(("RUNNING", "COMPLETING")):
        return f"SLURM job {job} {state}{f', {reason}' if reason != 'None' else ''} ({signum.name})"
    if past_time_limit(fields):  # the controller signals before it marks the job TIMEOUT
        return f"SLURM job {job} TIMEOUT ({signum.name} at its time limit, hydra.launcher.timeout_min)"
    # scancel signals the job before the controller marks it CANCELLED: the launcher says which it was
    return f"SLURM job {job}: {signum.name} (scancel or preemption)"


def slurm_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Reason, RunTime, TimeLimit …) as the controller holds them."""
    try:
        done = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(f.split("=", 1) for f in done.stdout.split() if "=" in f)


def past_time_limit(fields: dict[str, str]) -> bool:
    """Whether the job has run its whole TimeLimit (`[days-]hh:mm:ss`, or UNLIMITED)."""

    def seconds(text: str) -> int | None:
        days, _, clock = text.rpartition("-")
        parts = clock.split(":")
        if not all(p.isdigit() for p in parts) or not (days.isdigit() or not days):
            return None  # UNLIMITED, Partition_Limit, or absent
        total = 0
        for part in parts:
            total = total * 60 + int(part)
        return total + int(days or 0) * 86400

    run, limit = seconds(fields.get("RunTime", "")), seconds(fields.get("TimeLimit", ""))
    return run is not None and limit is not None and run >= limit


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
