"""A run created in bulk (sqlstore.start_runs) is the run MLflow's API creates: params, tags and their
order, status, times, artifact location, and what the run's lifecycle (train.finish) adds to it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlflow.tracking import MlflowClient

from bpexp.names import Outcome
from bpexp.recorder import SCHEMA_REVISION, schema_revision
from bpexp.result import RunResult
from bpexp.sqlstore import SqliteRun, start_runs
from bpexp.tracking import Tracker
from bpexp.train import Run, finish, run_start
from tests.conftest import make_config


def test_a_run_created_in_bulk_is_the_run_the_client_creates(store, tmp_path):
    cfg = make_config("model.depth=2", "model.width=8")
    start = run_start(cfg, "member", None, {"bpexp.population": "0-abc", "bpexp.population_size": "2"})
    link = {"bpexp.sweep": "s", "bpexp.job": "3"}
    through_client = Tracker(store, "bpexp", parent_run_id="p" * 32, tags=link)
    through_client.start(*start)
    path = store.removeprefix("sqlite:///")
    assert schema_revision(path) == SCHEMA_REVISION  # else start_runs would not write in bulk
    trackers = [Tracker(store, "bpexp", parent_run_id="p" * 32, tags=link) for _ in range(2)]
    in_bulk = start_runs(trackers, [start, start])
    assert all(isinstance(run, SqliteRun) for run in in_bulk)

    for tracker in [through_client, *in_bulk]:
        out = tmp_path / str(tracker.run_id)
        out.mkdir()
        result = RunResult(name="member", out_dir=out, outcome=Outcome.diverged)
        result.diverged_step, result.diverged_layer = 3, 1  # a tag and a metric, written at the end
        finish(cfg, Run(tracker, result), figure=False)

    client = MlflowClient(store)
    expected, *got = [client.get_run(t.run_id) for t in [through_client, *in_bulk]]
    with sqlite3.connect(path) as db:  # the UI lists tags in the order they were inserted
        order = "select key from tags where run_uuid = ? order by rowid"
        for run in got:
            assert (
                db.execute(order, (run.info.run_id,)).fetchall()
                == db.execute(order, (expected.info.run_id,)).fetchall()
            )
    for run in got:
        assert run.info.run_id != expected.info.run_id
        assert run.data.params == expected.data.params and len(run.data.params) > 40
        assert own_tags(run) == own_tags(expected)  # the note names the run's id
        assert run.data.metrics == expected.data.metrics == {"diverged/step": 3.0}
        info, want = dict(run.info), dict(expected.info)
        for key in ("run_id", "run_uuid", "start_time", "end_time", "artifact_uri"):
            info.pop(key, None), want.pop(key, None)
        assert info == want and run.info.status == "FINISHED"
        assert run.info.artifact_uri == expected.info.artifact_uri.replace(
            expected.info.run_id, run.info.run_id
        )
        assert abs(run.info.start_time - expected.info.start_time) < 60_000
        assert expected.info.start_time <= run.info.start_time <= run.info.end_time
        assert (
            listing(client, run)
            == listing(client, expected)
            == [("config.yaml", False), ("dynamics.parquet", False)]
        )
        files = Path(run.info.artifact_uri.removeprefix("file://"))
        expected_files = Path(expected.info.artifact_uri.removeprefix("file://"))
        assert (files / "config.yaml").stat().st_mode == (expected_files / "config.yaml").stat().st_mode
        assert (files / "config.yaml").read_text() == (tmp_path / run.info.run_id / "config.yaml").read_text()


def listing(client: MlflowClient, run) -> list[tuple[str, bool]]:
    return sorted((a.path, a.is_dir) for a in client.list_artifacts(run.info.run_id))


def own_tags(run) -> dict[str, str]:
    return {key: value.replace(run.info.run_id, "<run id>") for key, value in run.data.tags.items()}
