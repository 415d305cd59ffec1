"""Recording off the training loop: a writer process owns the run's MLflow record; the loop hands over.

Over 400 lines: both ends of one pipe protocol (the trainer's RecordingTracker and the writer's
serve loop) and the bulk SQL they feed, kept together so every message is defined in one place.

Shape. `RecordingTracker` (the training side, what `make_tracker` returns for tracking=mlflow) starts
`python -m bpexp.recorder` as a child process and sends it pickled messages through the child's stdin:
start, metrics (step, timestamp, values), tags, artifacts, end. The child imports MLflow, creates the
run, writes, and ends the run; the trainer never imports MLflow on its way to the first step.
- A process, not a thread: MLflow's store holds the GIL for ~0.25 ms per value, inside the loop's
  process a thread only moves that cost around (measured: slower than logging inline).
- A pipe, not shared memory: one probe step is a few kB, one pickle and one write(2) (~20 µs); a pipe
  keeps messages in order, and its end-of-file is how the writer learns that the trainer is gone.
- `subprocess` of `-m bpexp.recorder`, not multiprocessing: fork under torch's threads is unsafe, and
  spawn would re-import the trainer's __main__ (Hydra); the child imports no torch.
The loop never waits on the store: the writer's reader thread empties the pipe into memory as fast
as it fills, and the writer writes in batches (when it runs idle, or every FLUSH_SECONDS, or BATCH
values), so a slow store grows the writer's queue, not the step time. The trainer waits only for the
run id, when it asks for it (after the loop), and for the bounded drain at the end (DRAIN_LIMIT).

Store speed. Into an SQLite store at SCHEMA_REVISION (the alembic revision MLflow 3.17 creates),
`SqliteMetrics` writes MLflow's own tables, `metrics` and `latest_metrics`, with two executemany
statements in one transaction: the rows MLflow's `log_batch` writes (NaN as value 0 with is_nan,
±inf as ±max float, duplicates ignored by the primary key), and `latest_metrics` upserted with
MLflow's rule (the greatest (step, timestamp, value) wins). Any other revision, and any server URI,
goes through `MlflowClient.log_batch` (`ClientMetrics`). Everything else (experiment, run, params,
tags, artifacts, status) goes through MLflow's public API, except a population's members on such a
store: bpexp/sqlstore.py creates and ends them in bulk.

What MLflow gets: tracking.history. `dynamics.parquet` always keeps every probe.
- `full` (default): every probe. A lone run, or a few dozen: the UI shows every step.
- `every_k`: the scalar keys (losses, ratios, totals) at every probe, the per-layer keys (`…/lNNN`)
  at steps that are multiples of tracking.history_every, and at the last probe. Long runs, big sweeps.
- `summary`: the scalars at every probe, the per-layer keys at the first probe (initialization) and
  the last. Populations of hundreds or thousands: MLflow holds what its UI can show, pandas the rest.
The last probe's per-layer values are held back by the writer and written when the run ends, so
they survive a killed trainer too.

Ends. SIGTERM or Ctrl-C of the trainer: train.py unwinds, the trainer sends `end KILLED`, the writer
writes everything it was handed and closes the run (the writer ignores SIGINT, SIGTERM and SIGUSR2: a
Ctrl-C, scancel or SLURM's time-limit warning reaches every process of the job, and the trainer decides
how the run ends). SIGKILL of the trainer (or any death without `end`): the writer reads end-of-file,
writes what it had, tags `bpexp.killed_by` and ends the run KILLED. A writer that dies: the trainer sees
it at the next hand-over (`RecorderDied`, with the writer's own error when it left one), and closes the
run FAILED through MLflow's API itself, with the message in the tag `bpexp.error`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from bpexp.config import History as HistoryChoice
from bpexp.names import Outcome, Tag, split_key
from bpexp.tracking import StoreError, Tracker, param_value

log = logging.getLogger("bpexp.recorder")

SCHEMA_REVISION = "dc11669786a5"  # alembic head of MLflow 3.17's SQL store: the tables SqliteMetrics writes
FLUSH_SECONDS = 0.5  # the UI is at most this far behind a live run
BATCH = 20_000  # values per transaction at most, so one writer never holds the SQLite lock for long
DRAIN_LIMIT = 60.0  # seconds the trainer waits for the writer at the end, then leaves it to finish alone
LOCK_TIMEOUT = 120.0  # seconds a transaction waits for the SQLite lock held by other writers
HISTORY_MODES = tuple(mode.value for mode in HistoryChoice)  # the config's choices, by name
MAX_FLOAT = sys.float_info.max
WRITER_IGNORES = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2}  # see main()
Row = tuple[str, float, int, int]  # key, value, timestamp (ms), step


class RecorderDied(StoreError):
    """The writer process is gone before the run ended; the message says why, when it could tell."""


def is_layer_key(key: str) -> bool:
    """`grad_norm/l007` is per-layer; `train/loss`, `delta/log10_ratio` are scalars."""
    return split_key(key)[1] is not None


class History:
    """Which probe values MLflow gets (module docstring); the last per-layer probe is held back."""

    def __init__(self, mode: str = "full", every: int = 100):
        if mode not in HISTORY_MODES:
            raise ValueError(f"tracking.history={mode!r} is not one of: {', '.join(HISTORY_MODES)}")
        self.mode, self.every = mode, every
        self.held: list[Row] = []  # the latest per-layer values not yet written
        self.first_written = False

    def select(self, step: int, timestamp: int, metrics: dict[str, float]) -> list[Row]:
        rows = [(key, value, timestamp, step) for key, value in metrics.items()]
        if self.mode == "full":
            return rows
        layers = [row for row in rows if is_layer_key(row[0])]
        if not layers:
            return rows
        now = step % self.every == 0 if self.mode == "every_k" else not self.first_written
        self.first_written = self.first_written or now
        self.held = [] if now else layers
        return rows if now else [row for row in rows if not is_layer_key(row[0])]

    def last(self) -> list[Row]:
        held, self.held = self.held, []
        return held


def sanitize(value: float) -> tuple[float, bool]:
    """(value, is_nan) as MLflow's SQL store keeps them: NaN as 0 with is_nan, ±inf as ±max float."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), False
    return value, False


class ClientMetrics:
    """Metrics through MLflow's public API: any store, any schema, a server."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def write(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        for i in range(0, len(rows), 1000):  # log_batch takes at most 1000 metrics per call
            metrics = [Metric(key, value, ts, step) for key, value, ts, step in rows[i : i + 1000]]
            self.client.log_batch(self.run_id, metrics=metrics)


class SqliteMetrics:
    """Metrics into MLflow's SQLite tables with bulk statements: what `log_batch` writes, ~20× faster."""

    def __init__(self, path: str, run_id: str):
        self.run_id = run_id
        self.db = sqlite3.connect(path, timeout=LOCK_TIMEOUT, isolation_level=None)

    def write(self, rows: list[Row]) -> None:
        metrics, latest = [], {}
        for key, raw, timestamp, step in sorted(rows):  # key order: each index is filled in order
            value, is_nan = sanitize(raw)
            metrics.append((key, value, timestamp, self.run_id, step, is_nan))
            if key not in latest or (step, timestamp, value) > latest[key][2::-1]:
                latest[key] = (value, timestamp, step, is_nan)
        with immediate(self.db):
            self.db.executemany(
                "INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                metrics,
            )
            self.db.executemany(
                "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key, run_uuid) DO UPDATE SET"
                " value = excluded.value, timestamp = excluded.timestamp, step = excluded.step,"
                " is_nan = excluded.is_nan WHERE (excluded.step, excluded.timestamp, excluded.value)"
                " > (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)",
                [(key, *latest[key], self.run_id) for key in latest],
            )


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an SQLite connection (isolation_level=None): committed whole, or
    rolled back whole."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def schema_revision(path: str) -> str | None:
    """The alembic revision of an SQLite store, or None if it has none."""
    with contextlib.closing(sqlite3.connect(path, timeout=LOCK_TIMEOUT)) as db:
        try:
            return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        except (sqlite3.Error, TypeError):
            return None


def metric_writer(
    client: Any, uri: str, run_id: str, revision: str = SCHEMA_REVISION
) -> ClientMetrics | SqliteMetrics:
    """Bulk SQL into an SQLite store at `revision`; MLflow's public API for anything else."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if schema_revision(path) == revision:
            return SqliteMetrics(path, run_id)
        log.info("store %s is not at schema %s: metrics go through log_batch", uri, revision)
    return ClientMetrics(client, run_id)


class RunWriter:
    """The writer process's run: created through MLflow, metrics through `metric_writer`."""

    def __init__(self, start: dict[str, Any], revision: str = SCHEMA_REVISION):
        self.tracker = Tracker(
            start["uri"], start["experiment"], start["parent_run_id"], start["tags"], start["timeout"]
        )
        self.experiment_id = self.tracker.experiment_id()  # a new store's schema: under tracking's lock
        self.tracker.start(start["run_name"], start["params"], start["run_tags"])
        self.run_id: str = self.tracker.run_id  # type: ignore[assignment]
        self.metrics = metric_writer(self.tracker, self.tracker.uri, self.run_id, revision)
        self.history = History(start["history"], start["history_every"])
        self.rows: list[Row] = []
        self.last_write = time.monotonic()

    def add(self, step: int, timestamp: int, values: dict[str, float]) -> None:
        for row in self.history.select(step, timestamp, values):
            if math.isfinite(row[1]):  # non-finite values break MLflow's run pages; the Parquet has them
                self.rows.append(row)

    def due(self) -> bool:
        return len(self.rows) >= BATCH or (
            bool(self.rows) and time.monotonic() - self.last_write >= FLUSH_SECONDS
        )

    def write(self) -> None:
        while self.rows:
            batch, self.rows = self.rows[:BATCH], self.rows[BATCH:]
            self.metrics.write(batch)
        self.last_write = time.monotonic()

    def end(self, status: str, tags: dict[str, str] | None = None) -> None:
        self.rows.extend(row for row in self.history.last() if math.isfinite(row[1]))
        self.write()
        if tags:
            self.tracker.set_tags(tags)
        self.tracker.end(status)  # a lost store: noted, and closed at the next contact


def log_history(tracker: Tracker, records: list[tuple[int, dict[str, float]]], mode: str, every: int) -> None:
    """A run's probes that already exist (a population's member) into its store in one go, as the
    writer would have written them: tracking.history's choice, bulk SQL where the store allows."""
    if tracker.run_id is None:
        return
    history, now = History(mode, every), int(time.time() * 1000)
    rows = [row for step, metrics in records for row in history.select(step, now, metrics)]
    rows = [row for row in [*rows, *history.last()] if math.isfinite(row[1])]
    metrics = metric_writer(tracker, tracker.uri, tracker.run_id)
    for i in range(0, len(rows), BATCH):
        metrics.write(rows[i : i + BATCH])


def read_messages(inbox: BinaryIO, messages: queue.Queue) -> None:
    """The writer's reader thread: the pipe into memory as fast as it fills; None at end-of-file."""
    try:
        while True:
            messages.put(pickle.load(inbox))
    except (EOFError, OSError, pickle.UnpicklingError):
        messages.put(None)


def serve(inbox: BinaryIO, outbox: BinaryIO, parent: int) -> int:
    """The writer process: messages in order until `end`, or end-of-file when the trainer is gone."""
    messages: queue.Queue = queue.Queue()
    threading.Thread(target=read_messages, args=(inbox, messages), daemon=True).start()

    def reply(*message: Any) -> None:
        pickle.dump(message, outbox)
        outbox.flush()

    run: RunWriter | None = None
    try:
        while True:
            try:
                timeout = FLUSH_SECONDS if run is not None and run.rows else None
                message = messages.get(timeout=timeout)
            except queue.Empty:  # idle: what is buffered goes to the store now
                run.write()  # type: ignore[union-attr]
                continue
            if message is None:  # end-of-file without `end`: the trainer died (SIGKILL, OOM, crash)
                if run is not None:
                    killed = f"trainer process {parent} ended without closing the run (SIGKILL, OOM or crash)"
                    run.end("KILLED", {Tag.outcome: Outcome.killed, Tag.killed_by: killed})
                return 0
            kind, *args = message
            if kind == "start":
                run = RunWriter(args[0])
                reply("started", run.run_id, run.experiment_id)
            elif kind == "metrics":
                run.add(*args)  # type: ignore[union-attr]
            elif kind == "tags":
                run.tracker.set_tags(args[0])  # type: ignore[union-attr]
            elif kind == "artifact":
                run.write()  # type: ignore[union-attr]
                run.tracker.log_artifact(*args)  # type: ignore[union-attr]
            elif kind == "end":
                run.end(args[0])  # type: ignore[union-attr]
                reply("ended")
                return 0
            if run is not None and run.due():
                run.write()
    except BaseException as err:  # the trainer reads this at its next hand-over
        if not isinstance(err, StoreError):  # a lost store is said in one line, by the trainer
            traceback.print_exc()
        if run is not None and run.tracker.lost:
            run.tracker.remember_unclosed("FAILED")  # the next contact with the store closes the run
        with contextlib.suppress(OSError):
            reply("error", f"{type(err).__name__}: {err}")
        return 1


class RecordingTracker(Tracker):
    """The trainer's side: the same calls as Tracker, each one a message to the writer process."""

    def __init__(self, *args: Any, history: str = "full", history_every: int = 100, **kwargs: Any):
        super().__init__(*args, **kwargs)
        History(history, history_every)  # a bad mode fails here, before any process starts
        self.history, self.history_every = history, history_every
        self.process: subprocess.Popen | None = None
        self.started: tuple[str, str] | None = None  # (run id, experiment id), once the writer says
        self.failure: str | None = None  # why the writer is gone, once it is
        self.drain_seconds = math.nan  # how long `end` waited for the writer
        self.answers: queue.Queue = queue.Queue()  # read by a thread, so that waits can time out

    def close_unclosed(self) -> None:
        """The writer's own Tracker does this, in its process: the trainer does not import MLflow."""

    def launch(self) -> None:
        """Start the writer process (it imports MLflow while the loop runs: nothing waits for it)."""
        if self.process is None:
            command = [sys.executable, "-m", "bpexp.recorder", str(os.getpid())]
            # Blocked in the writer (the mask survives exec) until main() ignores them: SLURM's SIGUSR2
            # may come at once, and would kill a writer still importing, by its default action.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, WRITER_IGNORES)
            try:
                self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            reader = threading.Thread(target=read_messages, args=(self.process.stdout, self.answers))
            reader.daemon = True
            reader.start()

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        """Waits for the writer's answer the first time it is read (train.py asks after the loop)."""
        if self.started is None and self.process is not None and self.failure is None:
            with contextlib.suppress(RecorderDied):
                while self.started is None and self.answer()[0] != "error":
                    pass
        return self.started[0] if self.started else None

    def experiment_id(self) -> str:
        return self.started[1] if self.started else super().experiment_id()

    def answer(self, timeout: float | None = None) -> tuple:
        """The writer's next answer; `started` is kept, `error` becomes the failure."""
        message = self.answers.get(timeout=timeout)  # queue.Empty after `timeout` seconds
        if message is None:
            raise RecorderDied(self.died())
        if message[0] == "started":
            self.started = message[1], message[2]
        elif message[0] == "error":
            self.died(message[1])
        return message

    def died(self, error: str | None = None) -> str:
        """Why the writer is gone: how it ended, and its own error if it left one."""
        if self.failure is None:
            process = self.process
            code = process.wait()  # type: ignore[union-attr]
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            died = f"the recorder process (pid {process.pid}) died, {how}"  # type: ignore[union-attr]
            if error and error.startswith(f"{StoreError.__name__}: "):  # the store's own words lead
                died = f"{error.removeprefix(f'{StoreError.__name__}: ')}; {died}"
            elif error:
                died += f": {error}"
            self.failure = f"{died}; MLflow misses what it had not written (dynamics.parquet has every probe)"
        return self.failure

    def send(self, *message: Any) -> None:
        """One hand-over: a pickle into the pipe. Raises RecorderDied if the writer is gone."""
        process = self.process
        if self.failure is None and process.poll() is None:  # type: ignore[union-attr]
            try:
                pickle.dump(message, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[union-attr, arg-type]
                process.stdin.flush()  # type: ignore[union-attr]
                return
            except OSError:  # a broken pipe: the writer is gone
                pass
        with contextlib.suppress(RecorderDied):
            while self.failure is None and self.answer()[0] != "error":
                pass
        raise RecorderDied(self.died())

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.launch()
        start = {
            "uri": self.uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "tags": self.tags,
            "run_name": run_name,
            "params": {key: param_value(value) for key, value in params.items()},
            "run_tags": tags,
            "history": self.history,
            "history_every": self.history_every,
            "timeout": self.timeout,
        }
        self.send("start", start)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.process is not None:
            self.send("metrics", step, int(time.time() * 1000), metrics)

    def flush(self) -> None:
        """Nothing to wait for: the writer writes on its own, and `end` drains it."""

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.failure is not None:
            super().set_tags(tags)  # the writer is gone: from here, through MLflow
        elif self.process is not None:
            self.send("tags", {key: str(value) for key, value in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.failure is not None:
            super().log_artifact(path, artifact_path)
        elif self.process is not None:
            self.send("artifact", str(Path(path).resolve()), artifact_path)

    def end(self, status: str) -> None:
        """Hand over the end and wait for the writer to drain (at most DRAIN_LIMIT seconds)."""
        if self.process is None:
            return
        begin = time.monotonic()
        try:
            self.send("end", status)
            self.process.stdin.close()  # type: ignore[union-attr]
            while self.answer(timeout=max(0.0, begin + DRAIN_LIMIT - time.monotonic()))[0] != "ended":
                pass
            self.drain_seconds = time.monotonic() - begin
            log.debug("recorder drained in %.3f s", self.drain_seconds)
            return
        except RecorderDied:
            pass
        except queue.Empty:
            log.warning("the recorder (pid %d) is still writing; it ends the run", self.process.pid)
            return
        if self.run_id is not None:  # the writer is gone: the run ends FAILED from here
            super().set_tags({Tag.error: self.died()})
            self.call("set_terminated", self.run_id, "FAILED")
        raise RecorderDied(self.died())  # not all the run promised reached the store: never "completed"


def main() -> int:
    """`python -m bpexp.recorder PARENT_PID`: messages on stdin, answers on the real stdout."""
    for signum in WRITER_IGNORES:  # the trainer decides how the run ends; SLURM's SIGUSR2 (time limit
        signal.signal(signum, signal.SIG_IGN)  # near) reaches the whole job
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WRITER_IGNORES)  # blocked since the spawn: now ignored
    outbox = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything MLflow prints goes to stderr, never into the answers
    return serve(sys.stdin.buffer, outbox, int(sys.argv[1]))


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: the reader thread may hold stdin's lock, which finalization then aborts on
