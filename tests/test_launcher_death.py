"""A joblib launcher killed with SIGKILL: its workers stop their runs (KILLED) and exit, and the sweep's
parent is closed KILLED the next time the store is read (here by the report).

The real CLI, the real joblib launcher and a real SQLite store; the test waits on the store and on the
processes themselves (with deadlines), never on a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bpexp.lifecycle import past_time_limit, process_alive
from tests.conftest import cli, cli_env, store_runs, until


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_killed_joblib_launcher_stops_its_workers_and_the_report_closes_the_sweep(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    long_jobs = ["train.steps=1000000", "probes.every=1000", "model.depth=2", "model.width=8"]
    command = cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *long_jobs, "seed=0,1,2,3")
    command.append(f"hydra.sweep.dir={tmp_path}/sweep")
    launcher = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # Two fresh joblib workers import torch and MLflow before a job's run exists: ~20 s here, more
        # when the other test worker loads the machine.
        first_run = lambda: any(r.data.tags.get("bpexp.job") for r in store_runs(store))  # noqa: E731
        until(first_run, 300, "no job's run in the store", launcher)
        workers = descendants(launcher.pid)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    started = time.monotonic()
    until(lambda: not any(process_alive(pid) for pid in workers), 60, f"workers {workers} still alive")
    stopped = time.monotonic() - started
    children = [r for r in store_runs(store) if r.data.tags.get("bpexp.role") != "sweep"]
    assert children and {(r.info.status, r.data.tags["bpexp.outcome"]) for r in children} == {
        ("KILLED", "killed")
    }
    parent = next(r for r in store_runs(store) if r.data.tags.get("bpexp.role") == "sweep")
    assert parent.info.status == "RUNNING"  # nothing has read the store since the launcher died

    report = [sys.executable, "-m", "bpexp.report", "--tracking-uri", store, "--out-dir", str(tmp_path / "r")]
    shown = subprocess.run(report, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-3000:]
    parent = MlflowClient(store).get_run(parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["bpexp.outcome"] == "killed"
    assert f"launcher process {launcher.pid}" in parent.data.tags["bpexp.killed_by"]
    assert "killed" in parent.data.tags["bpexp.summary"]
    print(f"workers {sorted(workers)} gone {stopped:.1f} s after the launcher's SIGKILL")


@pytest.mark.parametrize(
    ("run", "limit", "past"),
    [
        ("00:02:00", "00:02:00", True),
        ("00:01:59", "00:02:00", False),
        ("1-00:00:01", "1-00:00:00", True),
        ("2-00:00:00", "UNLIMITED", False),
        ("00:00:30", "Partition_Limit", False),
        ("", "00:01:00", False),
    ],
)
def test_a_sigterm_at_the_time_limit_is_told_from_scancel_by_the_jobs_run_time(run, limit, past):
    """SLURM signals a job at its limit before marking it TIMEOUT: RunTime ≥ TimeLimit tells it apart."""
    assert past_time_limit({"RunTime": run, "TimeLimit": limit}) is past
