"""Shared fixtures: the real composed config (shrunk per test) and a fresh SQLite store under tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bpexp.config import Config, to_config
from bpexp.tracking import open_client

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def no_user_store(monkeypatch):
    """Tests never write to a store named by the caller's environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def make_config(*overrides: str) -> Config:
    """The real train.yaml, composed with Hydra, shrunk to a few steps unless the overrides say otherwise."""
    small = ["train.steps=6", "probes.every=2", "train.eval_every=3", "model.depth=3", "model.width=16"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("train", overrides=[*small, *overrides]))


def cli(*args: str) -> list[str]:
    """The command line a user types: python -m bpexp.train ..."""
    return [sys.executable, "-m", "bpexp.train", *args]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def as_in_a_terminal() -> None:
    """preexec_fn for a command the test stops with Ctrl-C: SIGINT at its default, as a terminal's
    foreground job has it. A CI runner or a shell's background job may start the tests with SIGINT
    ignored, a child inherits that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def until(
    condition: Callable[[], object], seconds: float, what: str, process: subprocess.Popen | None = None
) -> object:
    """Poll `condition` until it holds; fail naming `what` after `seconds`, or as soon as `process` (the
    command under test, its stderr piped) exits, with the end of its stderr."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process is not None and process.poll() is not None:
            said = process.stderr.read()[-3000:]
            raise AssertionError(f"{what}: the command exited {process.returncode}:\n{said}")
        time.sleep(0.2)
    if process is not None:  # what it said so far; the caller's cleanup finds it ended
        process.kill()
        said = process.communicate()[1][-3000:]
        raise AssertionError(f"after {seconds} s: {what}; the command said:\n{said}")
    raise AssertionError(f"after {seconds} s: {what}")


def store_runs(store: str, experiment: str = "bpexp") -> list:
    """Every run of `experiment`, read while the command under test may still be creating the store: the
    client is made under bpexp's store lock, as the command's own processes make theirs (MLflow's schema
    migration of a new SQLite file is not safe to race)."""
    client = open_client(store, timeout=30)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []
