"""The faults a real user hits, each with one clear outcome: stores, servers, data and config.

Everything goes through the real component: real SQLite stores under tmp_path, a real `bpexp-server`
(reached through a small proxy that can drop every request, as a server that went away does), fake
servers of a few lines of http.server for a server whose API fails or hangs, and the real CLI.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bpexp.config import ConfigError
from bpexp.data import make_data, write_idx
from bpexp.server import stop_server
from bpexp.tracking import Tracker, check_sqlite_store
from tests.conftest import cli, cli_env, make_config


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python -m bpexp.train with a tiny net; the timeout is what turns minutes of retries into a failure."""
    small = [
        "train.steps=2",
        "probes.every=1",
        "model.depth=2",
        "model.width=8",
        f"hydra.run.dir={tmp_path}/o",
    ]
    return subprocess.run(
        cli(*small, *args), cwd=tmp_path, env=env or cli_env(), capture_output=True, text=True, timeout=90
    )


def one_message(done: subprocess.CompletedProcess) -> str:
    """The error a user reads: one `bpexp:` line and no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("bpexp:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ---- the embedded store ---------------------------------------------------------------------------


def first_use(uri: str, i: int) -> None:
    check_sqlite_store(uri)
    tracker = Tracker(uri, "race")
    tracker.start(f"run{i}", {"i": i}, {})
    tracker.end("FINISHED")


@pytest.mark.slow
def test_concurrent_first_use_of_a_new_store_records_every_run(tmp_path):
    """8 processes open a store that does not exist yet, 5 times over: 40/40 runs, every store usable.
    (Before the lock: 1, 0 and 0 of 4, and stores broken for good by half-done migrations.)"""
    fork = multiprocessing.get_context("fork")  # mlflow is imported once, so the race stays a race
    recorded = 0
    for repetition in range(5):
        uri = f"sqlite:///{tmp_path}/store{repetition}/mlflow.db"
        (tmp_path / f"store{repetition}").mkdir()
        workers = [fork.Process(target=first_use, args=(uri, i)) for i in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert [worker.exitcode for worker in workers] == [0] * 8
        first_use(uri, 8)  # the store still takes runs
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert sorted(run.info.status for run in runs) == ["FINISHED"] * 9
        recorded += len(runs) - 1
    assert recorded == 40


@pytest.mark.slow
def test_unwritable_store_folder_fails_in_seconds_naming_it(tmp_path):
    if os.geteuid() == 0:  # root writes through chmod; /sys refuses even root
        folder = Path("/sys")
    else:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
    done = run_cli(tmp_path, f"tracking.uri=sqlite:///{folder}/mlflow.db")
    assert done.returncode == 2
    assert f"folder {folder} is not writable" in one_message(done)


def test_another_programs_sqlite_file_is_refused_not_converted(tmp_path):
    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as db:
        db.execute("create table notes(x)")
    with pytest.raises(ConfigError, match=f"{path} belongs to another program \\(tables: notes\\)"):
        check_sqlite_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert db.execute("select name from sqlite_master").fetchall() == [("notes",)]


@pytest.mark.slow
def test_corrupt_store_is_named_in_one_message(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database, " * 100)
    done = run_cli(tmp_path)
    assert done.returncode == 2
    message = one_message(done)
    assert f"{tmp_path}/mlflow.db is not an SQLite store" in message and "not a database" in message


def test_experiment_names_keep_artifacts_inside_mlartifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name in ["..", ".", "../../elsewhere", "a/../../b"]:
        tracker = Tracker(uri, name)
        location = tracker.client.get_experiment(tracker.experiment_id()).artifact_location
        assert Path(location.removeprefix("file://")).resolve().parent == (tmp_path / "mlartifacts").resolve()


@pytest.mark.slow
def test_run_whose_artifacts_fail_to_save_ends_failed(tmp_path):
    """Nothing it promised may be missing from a FINISHED run, or sweep.resume would skip it for good."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "plots").write_text("a file where the run puts its figures")  # fails even as root
    done = run_cli(tmp_path)
    assert done.returncode == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bpexp").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["bpexp.outcome"] == "failed"
    assert "FileExistsError" in run.data.tags["bpexp.error"]
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "bpexp")
    assert tracker.find_finished(run.data.tags["bpexp.config_hash"]) is None  # resume reruns it


# ---- servers ---------------------------------------------------------------------------------------


def start_fake_server(hang: threading.Event, release: threading.Event) -> ThreadingHTTPServer:
    """/health answers 200; the API answers 500, or, once `hang` is set, nothing until `release`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health" and hang.is_set():
                release.wait()
                return
            self.send_response(200 if self.path == "/health" else 500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fake_server() -> Iterator[tuple[ThreadingHTTPServer, threading.Event]]:
    hang, release = threading.Event(), threading.Event()
    server = start_fake_server(hang, release)
    yield server, hang
    release.set()
    server.shutdown()


@pytest.mark.parametrize("failure", ["500", "hang"])
@pytest.mark.slow
def test_server_whose_api_fails_or_hangs_ends_the_run_in_seconds(tmp_path, fake_server, failure):
    server, hang = fake_server
    if failure == "hang":
        hang.set()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    done = run_cli(tmp_path, f"tracking.uri={uri}", "tracking.timeout=3")
    assert done.returncode == 1
    message = one_message(done)
    assert f"tracking server {uri} did not answer for 3 s (tracking.timeout)" in message
    assert ("500" in message) if failure == "500" else ("timeout" in message or "timed out" in message)


class Proxy(ThreadingHTTPServer):
    """Forwards to a real server until `gone` is set; then drops every request, as a dead server does."""

    daemon_threads = True

    def __init__(self, target: str):
        self.target, self.gone, self.metrics_seen = target, threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.gone.is_set():
            self.close_connection = True  # no answer at all
            return
        if self.path.endswith("/runs/log-batch") and b'"metrics"' in body:
            self.server.gone.set()  # the server goes away under the run's first metrics
            self.close_connection = True
            return
        request = urllib.request.Request(self.server.target + self.path, body or None, method=self.command)
        request.add_header("Content-Type", self.headers.get("Content-Type", "application/json"))
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def bpexp_server(tmp_path_factory) -> Iterator[tuple[subprocess.Popen, str]]:
    """`bpexp-server --host 0.0.0.0`: on every interface, reached here through 127.0.0.1."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bpexp.server",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--dir",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("ready http://") and line.split()[1].endswith(f":{port}"), line
        yield process, f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_run_that_loses_its_server_ends_failed_and_is_closed_at_next_contact(
    tmp_path, bpexp_server, monkeypatch
):
    _, target = bpexp_server
    proxy = Proxy(target)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = {**cli_env(), "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        done = run_cli(tmp_path, f"tracking.uri={uri}", "tracking.timeout=3", env=env)
        assert proxy.gone.is_set()
        assert done.returncode == 1
        assert f"tracking server {uri} did not answer for 3 s" in one_message(done)
        assert (tmp_path / "o" / "dynamics.parquet").stat().st_size > 0  # the record is on disk
        client = MlflowClient(target)
        (run,) = client.search_runs([client.get_experiment_by_name("bpexp").experiment_id])
        assert run.info.status == "RUNNING"  # for now: the server never heard the end

        proxy.gone.clear()  # the server is back; the next contact closes the run
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
        Tracker(uri, "bpexp", timeout=10)
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["bpexp.outcome"] == "failed"
        assert run.data.tags["bpexp.error"].startswith("tracking store lost")
        assert not list((tmp_path / "state").rglob("*.json"))
    finally:
        proxy.shutdown()


@pytest.mark.slow
def test_bpexp_server_stops_promptly_on_sigterm(bpexp_server):
    """Last of the server tests: it stops the module's server (a handler used to wait 20 s here)."""
    process, _ = bpexp_server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


# ---- data and config -------------------------------------------------------------------------------


def idx_config(folder: Path):
    return make_config("data=idx", f"data.path={folder}", "data.n_train=8", "data.n_val=2").data


def test_non_finite_idx_images_are_refused_naming_the_file(tmp_path):
    images = np.zeros((10, 2, 2), dtype=np.float32)
    images[3, 1, 0] = np.inf
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8) % 2)
    with pytest.raises(ConfigError, match=f"{tmp_path}/train-images-idx3-ubyte: 1 non-finite values"):
        make_data(idx_config(tmp_path), seed=0)


def test_idx_header_cut_short_is_refused_naming_the_file(tmp_path):
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ConfigError, match=f"{tmp_path}/train-images-idx3-ubyte: header cut short"):
        make_data(idx_config(tmp_path), seed=0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("data.noise=inf", "data.noise"),
        ("model.init_gain=nan", "model.init_gain"),
        ("model.init_std=-inf", "model.init_std"),
        ("optim.betas=[0.9,inf]", "optim.betas"),
        ("optim.clip_norm=inf", "optim.clip_norm"),
        ("tracking.timeout=inf", "tracking.timeout"),
    ],
)
def test_non_finite_hyperparameters_are_refused_at_compose_time(override, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        make_config(override)


# ---- sweeps and reports ----------------------------------------------------------------------------


def sweep(tmp_path: Path, *args: str, sweep_dir: str = "multirun") -> subprocess.CompletedProcess:
    """A real multirun of tiny nets on the store in tmp_path."""
    from tests.test_sweep import write_cases  # here: scripts/faults.py imports this module without pytest

    write_cases(tmp_path)
    command = cli(
        "-m",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f'hydra.sweep.dir="{tmp_path}/{sweep_dir}"',
        f"hydra.searchpath=[file://{tmp_path}/conf]",
        *args,
    )
    return subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)


def store_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("bpexp")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
def test_quote_in_the_sweep_folder_records_a_failed_job_once(tmp_path):
    """Job 1 fails after its run exists (a file where its plots/ folder goes): the sweep finds that run
    by job number and parent, not by its folder in a filter string (MLflow keeps a backslash-escaped
    quote as it is, so `it's` matched nothing and the job got a second, empty FAILED child)."""
    (tmp_path / "it's" / "1").mkdir(parents=True)
    (tmp_path / "it's" / "1" / "plots").write_text("a file where the figures go")
    done = sweep(tmp_path, "experiment=ok0,ok1", sweep_dir="it's")
    assert done.returncode == 1, done.stderr[-3000:]
    runs = store_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags.get("bpexp.role") == "sweep")
    children = sorted((r.data.tags["bpexp.outcome"], r.info.status) for r in runs if r is not parent)
    assert children == [("completed", "FINISHED"), ("failed", "FAILED")], done.stderr[-3000:]
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_report_of_a_sweep_named_dotdot_stays_inside_its_folder(tmp_path):
    """`python -m bpexp.report ..` once wrote to <out-dir>/.., the folder above reports/."""
    done = sweep(tmp_path, "experiment=ok0")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run in store_runs(tmp_path):  # a sweep id is a tag: any program can write `..` there
        client.set_tag(run.info.run_id, "bpexp.sweep", "..")
    reports = tmp_path / "a" / "reports"
    command = [sys.executable, "-m", "bpexp.report", "..", "--out-dir", str(reports)]
    command += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    shown = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["reports"]
    assert (reports / "_" / "report.md").is_file()


@pytest.mark.slow
def test_sweep_that_fails_at_composition_leaves_no_parent(tmp_path):
    """`relux` fails the whole sweep before any job: no empty parent to hide the latest real sweep."""
    done = sweep(tmp_path, "experiment=ok0", "model.activation=relu,relux")
    assert done.returncode == 1 and "relux" in done.stderr, done.stderr[-3000:]
    assert store_runs(tmp_path) == []
