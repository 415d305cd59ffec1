"""The write path: real writer processes, a real SQLite store, read back through MlflowClient."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import time

import pytest
from conftest import as_in_a_terminal, cli, cli_env
from mlflow.tracking import MlflowClient

from bpexp.recorder import (
    ClientMetrics,
    History,
    RecordingTracker,
    SqliteMetrics,
    metric_writer,
)

# Out of order on purpose: latest_metrics keeps the greatest (step, timestamp, value), not the last written.
ROWS = [
    [("a", 1.0, 1000, 0), ("a", 2.0, 1000, 5), ("b/l001", math.nan, 1000, 0), ("b/l001", 0.5, 900, 3)],
    [("a", 3.0, 2000, 4), ("a", 2.0, 1000, 5), ("a", 0.0, 1001, 5), ("b/l001", math.inf, 999, 3)],
    [("c", -math.inf, 5, 7), ("c", 1.5, 5, 7), ("b/l001", 0.25, 5000, 2)],
]


def new_run(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name("bpexp") or client.get_experiment(
        client.create_experiment("bpexp")
    )
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple]:
    rows = client.get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp, str(m.value)) for m in rows)  # str: NaN == NaN


def stored(store: str, table: str, run_id: str) -> list[tuple]:
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        columns = "key, value, timestamp, step, is_nan"
        return sorted(db.execute(f"select {columns} from {table} where run_uuid = ?", (run_id,)))


def test_bulk_sql_writes_what_log_batch_writes_and_reads_back_identically(store):
    client = MlflowClient(store)
    bulk_run, api_run = new_run(client, "bulk"), new_run(client, "log_batch")
    bulk, api = (
        metric_writer(client, store, bulk_run),
        metric_writer(client, store, api_run, revision="other"),
    )
    assert isinstance(bulk, SqliteMetrics) and isinstance(api, ClientMetrics)  # the guard picks both paths
    for batch in ROWS:
        bulk.write(batch)
        api.write(batch)
    for table in ("metrics", "latest_metrics"):
        assert stored(store, table, bulk_run) == stored(store, table, api_run), table
    for key in ("a", "b/l001", "c"):
        assert history(client, bulk_run, key) == history(client, api_run, key), key
    latest = {run: client.get_run(run).data.metrics for run in (bulk_run, api_run)}
    assert latest[bulk_run] == pytest.approx(latest[api_run], nan_ok=True)
    assert latest[bulk_run]["a"] == 0.0  # step 5 beats step 4's later timestamp, then the later timestamp
    found = client.search_runs([client.get_run(bulk_run).info.experiment_id], "metrics.a = 0.0")
    assert {run.info.run_id for run in found} == {bulk_run, api_run}


def test_history_modes_choose_what_mlflow_gets():
    probes = [(step, {"train/loss": float(step), "g/l001": 1.0, "g/l002": 2.0}) for step in range(0, 50, 10)]

    def written(mode: str, every: int = 100) -> dict[int, set[str]]:
        h, steps = History(mode, every), {}
        for step, metrics in probes:
            for key, _, _, at in h.select(step, 0, metrics):
                steps.setdefault(at, set()).add(key)
        for key, _, _, at in h.last():
            steps.setdefault(at, set()).add(key)
        return steps

    every_key = {"train/loss", "g/l001", "g/l002"}
    assert written("full") == dict.fromkeys(range(0, 50, 10), every_key)
    assert written("summary") == {
        0: every_key,
        10: {"train/loss"},
        20: {"train/loss"},
        30: {"train/loss"},
        40: every_key,
    }
    assert written("every_k", 20) == {
        0: every_key,
        10: {"train/loss"},
        20: every_key,
        30: {"train/loss"},
        40: every_key,
    }
    with pytest.raises(
        ValueError, match=r"tracking.history='sometimes' is not one of: full, every_k, summary"
    ):
        History("sometimes")


def record(store: str, name: str, steps: int, keys: int, history: str = "full") -> RecordingTracker:
    """One run through a real writer process: `steps` probes of `keys` values each, then FINISHED."""
    tracker = RecordingTracker(store, "bpexp", history=history, history_every=10)
    tracker.start(name, {"model.depth": 3}, {"bpexp.outcome": "running"})
    for step in range(steps):
        tracker.log_metrics({f"q/l{k:03d}": step + k / 1000 for k in range(keys)} | {"loss": step}, step)
    return tracker


def test_four_concurrent_writers_into_a_fresh_store_lose_nothing(store):
    trackers = [
        record(store, f"run{i}", steps=100, keys=49) for i in range(4)
    ]  # the store does not exist yet
    for tracker in trackers:
        tracker.end("FINISHED")
    client = MlflowClient(store)
    for tracker in trackers:
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"model.depth": "3"}
        assert len(stored(store, "metrics", tracker.run_id)) == 100 * 50
        assert run.data.metrics["q/l048"] == 99.048 and run.data.metrics["loss"] == 99
        assert [m.step for m in client.get_metric_history(tracker.run_id, "q/l007")] == list(range(100))


def test_summary_history_keeps_the_layers_at_init_and_at_the_end(store):
    tracker = record(store, "summary", steps=25, keys=3, history="summary")
    tracker.end("FINISHED")
    client = MlflowClient(store)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "q/l002")] == [0, 24]
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 25
    assert client.get_run(tracker.run_id).data.metrics["q/l002"] == 24.002


# The kill tests: a real trainer (python -m bpexp.train) logging every step of a long run.
LONG_RUN = ["train.steps=10000000", "probes.every=1", "data=gaussian", "model.depth=2", "model.width=8"]


def start_trainer(tmp_path, store: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli(f"tracking.uri={store}", f"hydra.run.dir={tmp_path}/out", *LONG_RUN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        start_new_session=True,  # its own process group, as a terminal's job is
        preexec_fn=as_in_a_terminal,
    )


def wait_for(condition, what: str, timeout: float = 120.0):
    """Poll the store (or /proc) until `condition()` is truthy: synchronization on state, not on time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def recording_run(store: str) -> str:
    """The trainer's run id, once its writer has stored some probe steps (read with SQL: the store
    may be mid-creation, and MLflow's client would migrate it too)."""

    def run_id() -> str | None:
        try:
            with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
                found = db.execute("select run_uuid from metrics where key = 'train/loss' limit 1").fetchone()
        except sqlite3.Error:
            return None
        return found[0] if found else None

    return wait_for(run_id, "the trainer's first stored probes")


def ended(store: str, run_id: str):
    return wait_for(
        lambda: (r := MlflowClient(store).get_run(run_id)).info.status != "RUNNING" and r, "the run's end"
    )


def assert_whole_probes(store: str, run_id: str) -> None:
    """Every key holds the same steps, 0, 1, 2 … without a gap: no probe was written in part or lost."""
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        steps = dict(
            db.execute(
                "select key, group_concat(step) from metrics where run_uuid = ? group by key", (run_id,)
            )
        )
    layer_steps = {key: sorted(map(int, s.split(","))) for key, s in steps.items() if "/l0" in key}
    first = next(iter(layer_steps.values()))
    assert first == list(range(len(first))) and len(first) > 1
    assert all(s == first for s in layer_steps.values())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_writes_everything_and_ends_killed(tmp_path, store, signum):
    trainer = start_trainer(tmp_path, store)
    run_id = recording_run(store)
    os.killpg(trainer.pid, signum)  # the whole group, as Ctrl-C does: the writer must outlive it
    trainer.communicate(timeout=120)
    run = MlflowClient(store).get_run(run_id)  # the trainer waited for the writer's drain
    assert run.info.status == "KILLED" and run.data.tags["bpexp.outcome"] == "killed"
    assert_whole_probes(store, run.info.run_id)


@pytest.mark.slow
def test_sigkill_of_the_trainer_leaves_a_killed_run_with_its_probes(tmp_path, store):
    trainer = start_trainer(tmp_path, store)
    run_id = recording_run(store)
    trainer.kill()
    trainer.communicate(timeout=120)
    run = ended(store, run_id)  # the writer, orphaned, closes the run
    assert run.info.status == "KILLED" and run.data.tags["bpexp.outcome"] == "killed"
    assert f"trainer process {trainer.pid} ended without closing the run" in run.data.tags["bpexp.killed_by"]
    assert_whole_probes(store, run.info.run_id)


@pytest.mark.slow
def test_a_dead_writer_fails_the_run_with_the_reason(tmp_path, store):
    trainer = start_trainer(tmp_path, store)
    run_id = recording_run(store)
    children = f"/proc/{trainer.pid}/task/{trainer.pid}/children"
    with open(children) as pids:
        writer = int(pids.read().split()[0])
    os.kill(writer, signal.SIGKILL)
    _, stderr = trainer.communicate(timeout=120)
    assert trainer.returncode != 0
    message = f"the recorder process (pid {writer}) died, killed by signal 9"
    assert message in stderr, stderr[-2000:]
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["bpexp.outcome"] == "failed"
    assert message in run.data.tags["bpexp.error"]
