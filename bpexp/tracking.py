"""MLflow for one run: params once, metrics buffered into log_batch calls, tags, artifacts, status.

The only `import mlflow` on the training side. It talks to the store through an `MlflowClient` and a
run id, never through mlflow's global "active run", so a worker process that runs many jobs (joblib)
starts each from clean state.

Inside a sweep, bpexp/sweep.py hands each job its link to the sweep in $BPEXP_SWEEP (JSON: store,
experiment, parent run, tags): the job's run is then created there, as a child of the sweep's parent run.

Faults end in one message naming the store: a SQLite file that is missing, unwritable, corrupt or another
program's database is refused before MLflow touches it (MLflow would retry for minutes, or add its tables);
first use of a new SQLite store is serialized by a file lock (MLflow's schema migrations are not safe to
race); a server that stops answering is retried until `tracking.timeout`, then the run ends, and is closed
FAILED in the store the next time any bpexp process reaches that server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from bpexp.config import ConfigError, TrackingBackend, TrackingConfig
from bpexp.names import Tag, folder_name

METRICS_PER_CALL = 1000  # MLflow's log_batch limit
FLUSH_SECONDS = 10.0  # flush at least this often, so the UI follows a long run
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # opens in the training view
# MLflow announces its schema migrations at INFO on every new store: noise a user cannot act on.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# MLflow prints "🏃 View run … at: <link>" when a run on a server ends: the summary and the job lines
# already give the link (with the workflowType the UI needs); unset it to see MLflow's again.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

SWEEP_ENV = "BPEXP_SWEEP"  # set by bpexp/sweep.py around each job of a sweep, removed after it
# MLflow's REST errors worth retrying: no answer, a timeout, a 5xx (its other codes are the server's verdict).
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")


class StoreError(RuntimeError):
    """The tracking store stopped answering during a run; the message names it, the wait and the cause."""


def sweep_link() -> dict[str, Any] | None:
    """The sweep this process's job belongs to: {uri, experiment, parent_run_id, tags}, or None."""
    text = os.environ.get(SWEEP_ENV)
    return json.loads(text) if text else None


def resolve_uri(cfg: TrackingConfig, launch_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the launch directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{launch_dir.resolve()}/mlflow.db"


def check_reachable(uri: str) -> None:
    """Fail fast (before any run exists) on a server that does not answer or a store that cannot be used."""
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
        check_sqlite_store(uri)


def check_sqlite_store(uri: str) -> None:
    """In seconds, naming the file: a folder that is missing or not writable, a file that is no SQLite
    database, or another program's database (refused: MLflow would add its tables to it)."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.parent.is_dir():
        raise ConfigError(f"tracking.uri={uri!r}: folder {path.parent} does not exist")
    try:  # the lock file is a real write: it also catches what os.access cannot see (root, /sys)
        lock_path(path).touch()
    except OSError as err:
        raise ConfigError(
            f"tracking.uri={uri!r}: folder {path.parent} is not writable ({err.strerror}); "
            "SQLite writes beside its store"
        ) from None
    if not path.exists():
        return
    try:  # under the lock: a store being created by another process is seen whole, never half-made
        with store_lock(uri), closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error as err:
        raise ConfigError(f"tracking.uri={uri!r}: {path} is not an SQLite store ({err})") from None
    if tables and "alembic_version" not in tables:
        raise ConfigError(
            f"tracking.uri={uri!r}: {path} belongs to another program (tables: {', '.join(sorted(tables))}), "
            "not an MLflow store; bpexp leaves it alone: choose another file"
        )


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Held while a process opens a SQLite store: the first creates the schema, the others wait for it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(lock_path(Path(uri.removeprefix("sqlite:///"))), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def open_client(uri: str, timeout: float) -> Any:
    """An MlflowClient; creating one creates a SQLite store's schema, hence the lock."""
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        # Our deadline replaces MLflow's retries (7, with backoff: minutes) and its 120 s per request.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout / 3)))
    with store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def unclosed_folder() -> Path:
    """Runs that lost their server, each a JSON note, closed at the next contact with that server."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "bpexp" / "unclosed"


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
        timeout: float = 30.0,
        client: Any = None,
    ):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.tags = tags or {}  # set on the run at its creation (a sweep's link)
        self.timeout = timeout  # seconds a remote store may fail to answer before the run gives up
        self.remote = uri.startswith(("http://", "https://"))
        self.lost: str | None = None  # why the store stopped answering; then every call is skipped
        self._client: Any = client  # MLflow's client, opened on first use (see `client`), or shared
        self.buffer: list[Any] = []
        self.last_flush = time.monotonic()
        self.skipped = 0  # non-finite values kept out of MLflow (they break its run pages)
        self.known_experiment_id: str | None = None
        self.close_unclosed()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """client.<method>(...); a remote store is retried until tracking.timeout, then StoreError."""
        from mlflow.exceptions import MlflowException

        if self.lost:
            return None
        deadline, pause = time.monotonic() + self.timeout, 0.5  # from the first try: a hang counts too
        while True:
            try:
                return getattr(self.client, method)(*args, **kwargs)
            except MlflowException as err:
                if not self.remote or err.error_code not in TRANSIENT:
                    raise
                now = time.monotonic()
                if now >= deadline:
                    self.lost = first_line(err)
                    raise StoreError(
                        f"tracking server {self.uri} did not answer for {self.timeout:g} s "
                        f"(tracking.timeout): {self.lost}"
                    ) from None
                time.sleep(min(pause, deadline - now))  # backoff between tries of a server that failed
                pause = min(2 * pause, 5.0)

    def close_unclosed(self) -> None:
        """Close the runs of this store that an earlier process left RUNNING when the store went away."""
        from mlflow.exceptions import MlflowException

        folder = unclosed_folder()
        for note_file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            note = json.loads(note_file.read_text())
            if note["uri"] != self.uri:
                continue
            try:
                self.set_tags_of(note["run_id"], note["tags"])
                self.call("set_terminated", note["run_id"], note["status"])
            except MlflowException as err:  # the run was deleted since: nothing left to close
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            note_file.unlink(missing_ok=True)

    def remember_unclosed(self, status: str) -> None:
        """The store is gone: note the run, so that the next contact closes it FAILED (or KILLED)."""
        status = "KILLED" if status == "KILLED" else "FAILED"  # not all it promised reached the store
        tags = {Tag.outcome: status.lower(), Tag.error: f"tracking store lost: {self.lost}"}
        note = {"uri": self.uri, "run_id": self.run_id, "status": status, "tags": tags}
        folder = unclosed_folder()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.run_id}.json").write_text(json.dumps(note))

    @property
    def client(self) -> Any:
        """MLflow's client, opened on first use: a training process records through bpexp/recorder.py
        and never imports MLflow itself."""
        if self._client is None:
            self._client = open_client(self.uri, self.timeout)
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
        """The experiment's id, looked up once per run (a population's members ask M times)."""
        if self.known_experiment_id is None:
            self.known_experiment_id = self.find_or_create_experiment()
        return self.known_experiment_id

    def find_or_create_experiment(self) -> str:
        """Get or create the experiment (a concurrent creator may win the race: then read its id)."""
        from mlflow.exceptions import MlflowException

        found = self.call("get_experiment_by_name", self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = artifact_location(Path(self.uri.removeprefix("sqlite:///")).parent, self.experiment)
        try:
            return self.call("create_experiment", self.experiment, location, tags=EXPERIMENT_KIND)
        except MlflowException:
            found = self.call("get_experiment_by_name", self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self.run_id is not None:  # created already: a population's member, before its population trained
            return
        run = self.call("create_run", self.experiment_id(), run_name=run_name, tags=self.opening_tags(tags))
        self.run_id = run.info.run_id
        items = [Param(key, param_value(value)) for key, value in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.call("log_batch", self.run_id, params=items[i : i + 100])

    def opening_tags(self, tags: dict[str, str]) -> dict[str, str]:
        """The tags a run is created with: its own first (the UI lists tags in creation order), then
        the sweep's link and the parent."""
        tags = {**tags, **self.tags}
        if self.parent_run_id:
            tags[Tag.parent] = self.parent_run_id
        return tags

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
            self.call("log_batch", self.run_id, metrics=batch)
        self.last_flush = time.monotonic()

    def log_batch(self, run_id: str, **batch: Any) -> None:
        """MLflow's log_batch under this tracker's deadline: what the recorder's writer calls."""
        self.call("log_batch", run_id, **batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:  # interrupted before the run existed
            return
        self.set_tags_of(self.run_id, tags)

    def set_tags_of(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.call("log_batch", run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        self.call("log_artifact", self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """Flush what is buffered and close the run as FINISHED, FAILED or KILLED.

        If the store went away, the run is noted instead, and closed FAILED (or KILLED) at the next contact.
        """
        if self.run_id is None:
            return
        try:
            self.flush()
            self.call("set_terminated", self.run_id, status)
        finally:
            if self.lost:
                self.remember_unclosed(status)

    def find_finished(self, config_hash: str) -> Any | None:
        """The latest FINISHED run of this experiment whose bpexp.config_hash tag is config_hash."""
        found = self.call("get_experiment_by_name", self.experiment)
        if found is None:
            return None
        runs = self.call(
            "search_runs",
            [found.experiment_id],
            f"tags.`bpexp.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None


def artifact_location(root: Path, experiment: str) -> str:
    """<root>/mlartifacts/<experiment as a folder name>: no name (`..`, `a/../..`) can leave mlartifacts/."""
    return (root / "mlartifacts" / folder_name(experiment)).as_uri()


def make_tracker(
    cfg: TrackingConfig,
    launch_dir: Path,
    parent_run_id: str | None = None,
    writer: bool = True,
    link: dict[str, Any] | None = None,
    client: Any = None,
) -> NullTracker:
    """The run's tracker, inside a sweep in the sweep's store and experiment, under its parent run.
    `writer`: a training run records through its own writer process (bpexp/recorder.py); a run whose
    values already exist (a population's member) is written from this process. `link`: the sweep's,
    given before its job starts (else $BPEXP_SWEEP's). `client`: an open MlflowClient of that store to
    share (a population's members: opening one costs ~50 ms)."""
    from bpexp.recorder import RecordingTracker

    if cfg.backend == TrackingBackend.none:
        return NullTracker()
    link = link or sweep_link()
    if link is not None:
        uri, experiment, tags = link["uri"], link["experiment"], link["tags"]
        parent_run_id = parent_run_id or link["parent_run_id"]
    else:
        uri, experiment, tags = resolve_uri(cfg, launch_dir), cfg.experiment, None
        check_reachable(uri)
    if not writer:
        return Tracker(uri, experiment, parent_run_id, tags, cfg.timeout, client)
    history = {"history": cfg.history.value, "history_every": cfg.history_every}
    return RecordingTracker(uri, experiment, parent_run_id, tags, cfg.timeout, **history)
