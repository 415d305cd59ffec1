"""The command line as a user meets it: python -m bpexp.train, in a subprocess, on a real store."""

import signal
import sqlite3
import subprocess

import pytest
from conftest import as_in_a_terminal, cli, cli_env
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    return subprocess.run(
        cli(f"tracking.uri={store}", f"hydra.run.dir={tmp_path}/out", *args),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
        cwd=tmp_path,
    )


def runs_in(tmp_path) -> list:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("select status from runs").fetchall()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.activation=sigmoud", "expected one of [identity, sigmoid, tanh, relu"),
        ("model.depth=-1", "model.depth=-1 is not allowed: an integer ≥ 0"),
        ("model.depth=abc", "full_key: model.depth"),
        ("optim=foo", "Could not find 'optim/foo'"),
        ("model.foo=1", "no key 'model.foo' in the config; the keys there are: model.activation"),
        ("model.activaton=relu", "no key 'model.activaton' in the config; did you mean model.activation?"),
        ("seed=1 modle.depth=3", "no key 'modle.depth' in the config; did you mean model.depth?"),
        ("data=idx data.path=/no/such/folder", "data.path='/no/such/folder' is not allowed"),
        ("tracking.uri=http://127.0.0.1:9", "tracking.uri='http://127.0.0.1:9' is not reachable"),
        ("train.engine=manual model.norm=layernorm", "train.engine=manual cannot run model.norm=layernorm"),
    ],
)
def test_bad_input_fails_before_training_and_leaves_no_run(tmp_path, override, message):
    done = run_cli(tmp_path, *override.split())
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "+model" not in done.stderr
    assert runs_in(tmp_path) == []


def test_a_diverging_run_exits_0_and_is_recorded(tmp_path):
    done = run_cli(tmp_path, "optim=sgd", "optim.lr=1e4", "data=teacher", "train.steps=40")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "diverged" in done.stdout
    assert runs_in(tmp_path) == [("FINISHED",)]


@pytest.mark.parametrize("signum, by", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_ends_the_run_killed_in_one_line(tmp_path, signum, by):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen(
        cli(
            f"tracking.uri={store}", f"hydra.run.dir={tmp_path}/out", "train.steps=10000000", "data=gaussian"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        preexec_fn=as_in_a_terminal,
    )
    for line in proc.stdout:  # wait for the first step (the run exists), then stop it as a scheduler does
        if "/10000000 steps" in line:
            break
    proc.send_signal(signum)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, rest
    run = MlflowClient(store).search_runs(["1"])[0]
    assert run.info.status == "KILLED" and run.data.tags["bpexp.outcome"] == "killed"
    assert "Traceback" not in rest, rest[-3000:]  # it used to be 60 lines of one
    said = [line for line in rest.splitlines() if line.startswith("bpexp:")]
    assert said == [f"bpexp: run {run.info.run_name} killed by {by}"], rest[-3000:]


def test_the_readme_runs_the_default_job(tmp_path):
    done = run_cli(tmp_path, "train.steps=20")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed" in done.stdout and runs_in(tmp_path) == [("FINISHED",)]
