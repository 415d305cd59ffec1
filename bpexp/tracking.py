"""MLflow for one run: params once, metrics buffered into log_batch calls, tags, artifacts, status.

The only `import mlflow` on the training side. It talks to the store through an `MlflowClient` and a
run id, never through mlflow's global "active run", so a worker process that runs many jobs (joblib)
starts each from clean state.

Inside a sweep, bpexp/sweep.py hands each job its link to the sweep in $BPEXP_SWEEP (JSON: store,
experiment, parent run, tags): the job's run is then created there, as a child of the sweep's parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from bpexp.config import ConfigError, TrackingBackend, TrackingConfig

METRICS_PER_CALL = 1000  # MLflow's log_batch limit
FLUSH_SECONDS = 10.0  # flush at least this often, so the UI follows a long run
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # opens in the training view
# MLflow announces its schema migrations at INFO on every new store: noise a user cannot act on.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

SWEEP_ENV = "BPEXP_SWEEP"  # set by bpexp/sweep.py around each job of a sweep, removed after it


def sweep_link() -> dict[str, Any] | None:
    """The sweep this process's job belongs to: {uri, experiment, parent_run_id, tags}, or None."""
    text = os.environ.get(SWEEP_ENV)
    return json.loads(text) if text else None


def resolve_uri(cfg: TrackingConfig, launch_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the launch directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{launch_dir.resolve()}/mlflow.db"


def check_reachable(uri: str) -> None:
    """Fail fast (before any run exists) on a server that does not answer or a folder that is missing."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except OSError as err:
            raise ConfigError(
                f"tracking.uri={uri!r} is not reachable ({err}); allowed: a running MLflow server, "
                "a sqlite:/// path, or null for the embedded store"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri={uri!r}: folder {folder} does not exist")


def param_value(value: Any) -> str:
    """Params as MLflow strings that read back with YAML: null, true/false, numbers, JSON lists."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


class NullTracker:
    """tracking=none: the same calls, nothing stored."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def run_url(self) -> str | None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str) -> None:
        pass

    def find_finished(self, config_hash: str) -> Any | None:
        return None


class Tracker(NullTracker):
    """One MLflow run in `experiment` at `uri`."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.tags = tags or {}  # set on the run at its creation (a sweep's link)
        self._client: Any = None
        self.buffer: list[Any] = []
        self.last_flush = time.monotonic()
        self.skipped = 0  # non-finite values kept out of MLflow (they break its run pages)

    @property
    def client(self) -> Any:
        """MLflow's client, imported on first use (a training process records through bpexp/recorder.py)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def run_url(self) -> str | None:
        """This run's page; `workflowType` because MLflow 3.17's UI otherwise opens its GenAI pages."""
        if self.run_id is None:
            return None
        base = (
            self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        )
        return f"{base}/#/experiments/{self.experiment_id()}/runs/{self.run_id}?workflowType=machine_learning"

    def experiment_id(self) -> str:
        """Get or create the experiment (a concurrent creator may win the race: then read its id)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            slug = re.sub(r"[^\w.-]+", "_", self.experiment)
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / slug).as_uri()
        try:
            return self.client.create_experiment(self.experiment, location, tags=EXPERIMENT_KIND)
        except MlflowException:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        tags = {**tags, **self.tags}  # the run's own first: the UI lists tags in creation order
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(key, param_value(value)) for key, value in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if math.isfinite(value):
                self.buffer.append(Metric(key, value, now, step))
            else:
                self.skipped += 1
        if len(self.buffer) >= METRICS_PER_CALL or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            batch, self.buffer = self.buffer[:METRICS_PER_CALL], self.buffer[METRICS_PER_CALL:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self.run_id is None:  # interrupted before the run existed
            return
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """Flush what is buffered and close the run as FINISHED, FAILED or KILLED."""
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)

    def find_finished(self, config_hash: str) -> Any | None:
        """The latest FINISHED run of this experiment whose bpexp.config_hash tag is config_hash."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return None
        runs = self.client.search_runs(
            [found.experiment_id],
            f"tags.`bpexp.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None


def make_tracker(cfg: TrackingConfig, launch_dir: Path, parent_run_id: str | None = None) -> NullTracker:
    """The run's tracker (its writer process starts with the run); inside a sweep, in the sweep's store
    and experiment, under its parent run."""
    from bpexp.recorder import RecordingTracker

    if cfg.backend == TrackingBackend.none:
        return NullTracker()
    history = {"history": cfg.history.value, "history_every": cfg.history_every}
    link = sweep_link()
    if link is not None:
        parent = parent_run_id or link["parent_run_id"]
        return RecordingTracker(link["uri"], link["experiment"], parent, link["tags"], **history)
    uri = resolve_uri(cfg, launch_dir)
    check_reachable(uri)
    return RecordingTracker(uri, cfg.experiment, parent_run_id, **history)
