"""A population's runs created in MLflow's SQLite tables at once: what `Tracker.start` does M times.

MLflow creates a run in one transaction (`create_run`: the `runs` row and its tags) and logs its params
in another (`log_batch`), ~20 ms a run on an embedded store; a population of M members paid that M
times before it trained. Into an SQLite store at recorder.SCHEMA_REVISION (the revision whose tables
recorder.SqliteMetrics already writes), `start_runs` inserts every member's rows in one transaction:
the same columns MLflow's SqlAlchemyStore fills (user "unknown", source UNKNOWN, status RUNNING, the
artifact URI under the experiment's location), the tags in the order MLflow inserts them (the run's
own, then `mlflow.runName`), and the params as `log_batch` stores them. Any other store or revision
creates each run through MLflow's API (`Tracker.start`).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bpexp.recorder import LOCK_TIMEOUT, SCHEMA_REVISION, schema_revision
from bpexp.tracking import NullTracker, Tracker, param_value

RUN_NAME_TAG = "mlflow.runName"  # MLflow's tag for the run's name, added by create_run

Start = tuple[str, dict[str, Any], dict[str, str]]  # train.run_start's (run name, params, tags)


def start_runs(
    trackers: Sequence[NullTracker], starts: Sequence[Start], revision: str = SCHEMA_REVISION
) -> None:
    """Create each tracker's run from its start, as `tracker.start(*start)` would: the trackers on one
    SQLite store at `revision` in one transaction, any other one by one through MLflow."""
    bulk = [
        (tracker, start)
        for tracker, start in zip(trackers, starts, strict=True)
        if isinstance(tracker, Tracker) and tracker.run_id is None and in_bulk(tracker, trackers[0], revision)
    ]
    if bulk:
        insert_runs(bulk)
    done = {id(tracker) for tracker, _ in bulk}
    for tracker, start in zip(trackers, starts, strict=True):
        if id(tracker) not in done:
            tracker.start(*start)


def in_bulk(tracker: Tracker, first: NullTracker, revision: str) -> bool:
    """The tracker's store is the first tracker's, an SQLite file at `revision`."""
    return (
        tracker.uri == first.uri
        and tracker.uri.startswith("sqlite:///")
        and schema_revision(tracker.uri.removeprefix("sqlite:///")) == revision
    )


def insert_runs(bulk: list[tuple[Tracker, Start]]) -> None:
    """The `runs`, `tags` and `params` rows of every run, in one transaction (rolled back whole)."""
    from mlflow.utils.uri import append_to_uri_path

    first = bulk[0][0]
    experiment_id = first.experiment_id()
    experiment = first.call("get_experiment", experiment_id)
    if experiment.lifecycle_stage != "active":  # MLflow's create_run refuses it, in its own words
        for tracker, start in bulk:
            tracker.start(*start)
        return
    location, now = experiment.artifact_location, int(time.time() * 1000)
    runs, tags, params = [], [], []
    for tracker, (name, run_params, run_tags) in bulk:
        run_id = uuid.uuid4().hex
        tracker.known_experiment_id = experiment_id
        artifact_uri = append_to_uri_path(location, run_id, "artifacts")
        source = ("UNKNOWN", "", "", "unknown")  # source type, name, entry point, user: as MlflowClient's
        runs.append(
            (
                run_id,
                name,
                *source,
                "RUNNING",
                now,
                None,
                "",
                "active",
                artifact_uri,
                int(experiment_id),
                None,
            )
        )
        opening = tracker.opening_tags(run_tags)
        opening.setdefault(RUN_NAME_TAG, name)
        tags += [(key, str(value), run_id) for key, value in opening.items()]
        params += [(key, param_value(value), run_id) for key, value in run_params.items()]
        tracker.run_id = run_id
    path = first.uri.removeprefix("sqlite:///")
    db = sqlite3.connect(path, timeout=LOCK_TIMEOUT, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id,"
                " status, start_time, end_time, source_version, lifecycle_stage, artifact_uri,"
                " experiment_id, deleted_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                runs,
            )
            db.executemany('INSERT INTO tags ("key", value, run_uuid) VALUES (?, ?, ?)', tags)
            db.executemany('INSERT INTO params ("key", value, run_uuid) VALUES (?, ?, ?)', params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            for tracker, _ in bulk:
                tracker.run_id = None
            raise
    finally:
        db.close()
