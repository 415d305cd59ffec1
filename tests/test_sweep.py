"""Sweeps: real Hydra multiruns (basic, joblib, submitit_local, optuna) on real stores, in subprocesses.

Each sweep is made of tiny jobs (depth 2, width 8, 10 steps) written as experiment presets into a
folder on Hydra's search path: four healthy ones, one that diverges (SGD at η = 1e4), one whose IDX data
file is corrupt (it raises while loading data, before its run exists), and one whose length comes from
$BPEXP_SLOW_STEPS (so a test can stop it midway, and resume it short).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CONF, ROOT, cli, cli_env
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bpexp.config import config_hash, flatten, plain, to_config
from bpexp.data import write_idx
from bpexp.sweep import SweepCallback, SweepState, reset_process
from bpexp.train import DIVERGED_OBJECTIVE, config_yaml

TINY = {"model": {"depth": 2, "width": 8}, "train": {"steps": 10, "eval_every": 5}, "probes": {"every": 5}}
SIX = "experiment=ok0,ok1,ok2,ok3,diverge,corrupt"


# --------------------------------------------------------------------------------------------------
# Helpers


def write_cases(tmp_path: Path) -> Path:
    """Test presets in <tmp>/conf/experiment (on hydra.searchpath), and a folder with a corrupt IDX file."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "train-images-idx3-ubyte").write_bytes(b"\x08\x03garbage, not an IDX file")
    write_idx(corrupt / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    teacher = {"defaults": [{"override /data": "teacher"}, "_self_"]}
    cases = {f"ok{seed}": {**teacher, **TINY, "seed": seed} for seed in range(4)}
    cases["diverge"] = {
        "defaults": [{"override /data": "teacher"}, {"override /optim": "sgd"}, "_self_"],
        **TINY,
        "optim": {"lr": 1e4},
    }
    cases["corrupt"] = {
        "defaults": [{"override /data": "idx"}, "_self_"],
        **TINY,
        "data": {"path": str(corrupt), "n_train": 2, "n_val": 2},
    }
    slow = {**TINY["train"], "steps": "${oc.decode:${oc.env:BPEXP_SLOW_STEPS,10}}"}
    cases["slow"] = {**teacher, **TINY, "train": slow, "seed": 7, "tracking": {"run_name": "slow"}}
    folder = tmp_path / "conf" / "experiment"
    folder.mkdir(parents=True)
    for name, body in cases.items():
        text = OmegaConf.to_yaml(OmegaConf.create(body))
        (folder / f"{name}.yaml").write_text(f"# @package _global_\n{text}")
    return tmp_path / "conf"


def sweep_command(tmp_path: Path, *args: str, store: str | None = None) -> list[str]:
    store = store or f"sqlite:///{tmp_path}/mlflow.db"
    return cli(
        "-m",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={tmp_path}/multirun",
        f"hydra.searchpath=[file://{tmp_path}/conf]",
        *args,
    )


def run_sweep(tmp_path: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_command(tmp_path, *args, **kwargs),
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(), **(env or {})},
        cwd=tmp_path,
    )


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bpexp")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def split(runs: list) -> tuple:
    """(the one parent, its children): every run of the store must be one or the other."""
    parents = [r for r in runs if r.data.tags.get("bpexp.role") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.data.tags["bpexp.sweep"] == parent.data.tags["bpexp.sweep"] for r in children)
    return parent, children


def outcomes(children: list) -> list[str]:
    return sorted(r.data.tags["bpexp.outcome"] for r in children)


# --------------------------------------------------------------------------------------------------
# Unit: what crosses to a job's process, and what a reused worker resets


def test_the_callback_pickles_only_its_plain_state():
    callback = SweepCallback()
    callback.state = SweepState("s1", "parent", "sqlite:////x/mlflow.db", "bpexp", {"MLFLOW_X": "1"})
    callback.tracker = object()  # a live client never travels to a worker
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.state == callback.state and clone.tracker is None


def test_a_reused_worker_gets_back_the_launch_environment(monkeypatch):
    import mlflow
    import torch

    monkeypatch.setenv("MLFLOW_RUN_ID", "left-by-the-previous-job")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////changed/by/a/job.db")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        reset_process({"MLFLOW_TRACKING_URI": "sqlite:////launch.db"}, seed=3, threads=1)
        assert "MLFLOW_RUN_ID" not in os.environ
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////launch.db"
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
        drawn = torch.rand(1)
        torch.manual_seed(3)
        assert torch.equal(drawn, torch.rand(1))
    finally:
        torch.use_deterministic_algorithms(False)
    assert mlflow.active_run() is None


def test_config_hash_names_what_a_run_computes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose("train", overrides=["model.depth=3"])
        moved = compose(  # where it is recorded, how it is launched, how many threads: not the experiment
            "train",
            overrides=[
                "model.depth=3",
                "tracking.uri=sqlite:////a.db",
                "sweep.resume=true",
                "train.threads=2",
                "device=cpu",
            ],
        )
        other = compose("train", overrides=["model.depth=4"])
    assert config_hash(base) == config_hash(moved) == config_hash(to_config(base))
    assert config_hash(base) != config_hash(other)
    assert flatten(base) == flatten(to_config(base))


def test_a_typed_config_flattens_as_omegaconf_gives_it():
    """config.plain walks the dataclasses itself: the same dict, types included, for every preset; and
    train.config_yaml writes it as OmegaConf would."""
    presets = sorted(path.stem for path in (Path(CONF) / "experiment").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfgs = [to_config(compose("train", overrides=[f"experiment={name}"])) for name in presets]
    cfgs[0].optim.lr, cfgs[0].model.init_gain = 1, 2  # ints where floats belong, as code may set them
    for cfg in cfgs:
        expected = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
        assert repr(plain(cfg)) == repr(expected)
        assert config_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.structured(cfg))  # config.yaml


STUDIES = {
    "vanishing": 18,
    "exploding": 8,
    "optimizers": 9,
    "best_practices": 320,
    "best_practices_small": 320,
    "trainability": 32,
    "trainability_relu": 20,
    "edge_of_chaos": 12,
    "he_init": 8,
    "lr_search": 20,
    "seeds_at_scale": 576,
    "isometry": 36,
    "edge_of_stability": 4,
}


def dotted(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    pairs = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        pairs += dotted(value, f"{path}.") if isinstance(value, dict) else [(path, value)]
    return pairs


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_preset_is_global_holds_its_command_and_sweeps_the_whole_study(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# python -m bpexp.train -m experiment={name}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        preset = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
        parents = [d for d in preset.get("defaults", []) if isinstance(d, str)]  # a preset built on another
        base = flatten(compose("train", overrides=[f"experiment={p}" for p in parents]))
        for key, value in dotted(preset):  # a preset holds only what changes
            if not key.startswith(("hydra.", "defaults")):
                assert base.get(key) != value, f"{name}.yaml sets {key}={value!r}, already the default"
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        if "optuna" in sweeper._target_:
            jobs = sweeper.n_trials
            assert sweeper.n_jobs == 2 and sweeper.max_failure_rate == 1.0
        else:
            jobs = math.prod(len(str(v).split(",")) for v in sweeper.params.values())
            for override in [f"{k}={v.split(',')[-1]}" for k, v in sweeper.params.items()]:
                to_config(compose("train", overrides=[f"experiment={name}", override]))  # a valid job
    assert jobs == STUDIES[name]


def test_edge_of_chaos_sweeps_sigma_w2_from_half_to_4_on_a_deep_wide_tanh_net_at_init():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=edge_of_chaos"], return_hydra_config=True)
    m = cfg.model
    assert (
        m.depth >= 30 and m.width >= 256 and m.activation.value == "tanh" and m.init.value == "lecun_normal"
    )
    assert cfg.train.steps == 0 and cfg.data.name.value == "gaussian"
    gains = [float(g) for g in cfg.hydra.sweeper.params["model.init_gain"].split(",")]
    assert [round(g**2, 9) for g in gains] == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    biases = [float(b) for b in cfg.hydra.sweeper.params["model.bias_std"].split(",")]
    assert [round(b**2, 9) for b in biases] == [0.0, 0.05]


# --------------------------------------------------------------------------------------------------
# Slow: real multiruns


@pytest.fixture(scope="module", params=["basic", "joblib"])
def six_jobs(request, tmp_path_factory):
    """Six jobs (4 healthy, 1 diverging, 1 raising), each healthy one logging > 2000 metric values;
    under joblib, four at a time into one fresh SQLite store."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    write_cases(tmp_path)
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"] if request.param == "joblib" else []
    done = run_sweep(tmp_path, SIX, "train.steps=80", "probes.every=1", *extra)
    return tmp_path, f"sqlite:///{tmp_path}/mlflow.db", done


@pytest.mark.slow
def test_a_sweep_is_one_parent_and_survives_a_raise_and_a_divergence(six_jobs):
    tmp_path, store, done = six_jobs
    assert done.returncode == 1, done.stderr[-3000:]  # one job failed: the sweep says so
    assert "1 of 6 jobs failed" in done.stderr or "1 failed" in done.stderr, done.stderr[-3000:]
    parent, children = split(all_runs(store))
    assert len(children) == 6
    assert outcomes(children) == ["completed"] * 4 + ["diverged", "failed"]
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 5
    client = MlflowClient(store)
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "not an IDX file" in failed.data.tags["bpexp.error"]
    assert [a.path for a in client.list_artifacts(failed.info.run_id)] == ["traceback.txt"]
    diverged = next(r for r in children if r.data.tags["bpexp.outcome"] == "diverged")
    assert all(math.isfinite(v) for v in diverged.data.metrics.values())
    # the parent's summary
    assert parent.info.status == "FAILED"
    assert parent.data.tags["bpexp.summary"] == "6 jobs: 4 completed, 1 diverged, 1 failed"
    m = parent.data.metrics
    assert (m["sweep/jobs"], m["sweep/completed"], m["sweep/diverged"], m["sweep/failed"]) == (6, 4, 1, 1)
    assert SIX in parent.data.params["sweep.overrides"]
    table = pd.read_parquet(client.download_artifacts(parent.info.run_id, "runs.parquet", str(tmp_path)))
    assert len(table) == 6 and {"run_id", "outcome", "model.depth", "val/loss"} <= set(table.columns)
    assert sorted(table.outcome) == outcomes(children)
    assert len(pd.read_csv(client.download_artifacts(parent.info.run_id, "runs.csv", str(tmp_path)))) == 6


@pytest.mark.slow
@pytest.mark.parametrize("six_jobs", ["joblib"], indirect=True)
def test_four_parallel_jobs_lose_no_metric_and_race_on_nothing(six_jobs):
    tmp_path, store, done = six_jobs
    output = done.stdout + done.stderr
    assert "database is locked" not in output and "OperationalError" not in output
    _, children = split(all_runs(store))
    client = MlflowClient(store)
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("select count(*) from runs where experiment_id = 0").fetchone() == (0,)
        for run in children:
            if run.data.tags["bpexp.outcome"] != "completed":
                continue
            (stored,) = con.execute(
                "select count(*) from metrics where run_uuid = ?", (run.info.run_id,)
            ).fetchone()
            path = client.download_artifacts(run.info.run_id, "dynamics.parquet", str(tmp_path))
            assert stored == len(pd.read_parquet(path)) >= 2000  # every value the run measured is there


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sigterm_mid_sweep_leaves_nothing_running_and_resume_runs_only_the_rest(tmp_path, launcher):
    write_cases(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    args = ["experiment=ok0,slow,ok1,ok2", *extra]
    proc = subprocess.Popen(  # hydra.verbose: the debug line that says a run exists
        sweep_command(tmp_path, *args, "hydra.verbose=bpexp.train"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**cli_env(), "BPEXP_SLOW_STEPS": "100000000"},
        cwd=tmp_path,
    )
    for line in proc.stdout:  # the slow job's trainer runs, and its run exists (written by its recorder)
        if "run slow started (" in line and slow_run_exists(tmp_path / "mlflow.db"):
            break
    proc.send_signal(signal.SIGTERM)  # stop the sweep the way a scheduler does
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, rest[-3000:]
    parent, children = split(all_runs(store))
    assert parent.info.status == "KILLED", rest[-3000:]
    assert "RUNNING" not in {r.info.status for r in children}
    slow = next(r for r in children if r.info.run_name == "slow")
    assert slow.info.status == "KILLED" and slow.data.tags["bpexp.outcome"] == "killed"
    finished = {r.data.tags["bpexp.config_hash"] for r in children if r.info.status == "FINISHED"}

    # The same command with sweep.resume=true: the same parent, and runs for what was not FINISHED only.
    done = run_sweep(tmp_path, *args, "sweep.resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("skipped (sweep.resume") == len(finished)
    last = done.stdout.splitlines()[-1]  # this launch: what ran, what was skipped, the report command
    assert f"{4 - len(finished)} completed" in last and "Report: python -m bpexp.report" in last
    assert (f"; {len(finished)} skipped." in last) == bool(finished)
    parent_after, children_after = split(all_runs(store))
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    before = {r.info.run_id for r in children}
    new = [r for r in children_after if r.info.run_id not in before]
    assert len(new) == 4 - len(finished)
    assert not finished & {r.data.tags["bpexp.config_hash"] for r in new}
    assert parent_after.data.tags["bpexp.summary"] == "4 jobs: 4 completed"
    assert parent_after.data.metrics["sweep/launched"] == len(new)


def slow_run_exists(db: Path) -> bool:
    """Wait on the store (not on time) until the recorder has created the run named slow."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(db) as con:
            if con.execute("select 1 from runs where name = 'slow'").fetchone():
                return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_submitit_local_runs_the_same_code_path(tmp_path):
    write_cases(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_sweep(
        tmp_path, "experiment=ok0,ok1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = split(all_runs(store))
    assert outcomes(children) == ["completed", "completed"] and parent.info.status == "FINISHED"
    assert sorted(r.data.tags["bpexp.job"] for r in children) == ["0", "1"]


@pytest.mark.slow
def test_optuna_sees_a_diverged_trial_as_a_finite_worst_value(tmp_path):
    write_cases(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_sweep(
        tmp_path,
        "experiment=ok0",
        "optim=sgd",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_jobs=2",
        "optim.lr=choice(0.01,10000.0)",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, children = split(all_runs(store))
    assert outcomes(children) == ["completed", "diverged"]
    result = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    best = next(r for r in children if r.data.tags["bpexp.outcome"] == "completed")
    assert result.best_params["optim.lr"] == 0.01
    assert result.best_value == pytest.approx(best.data.metrics["val/loss"])
    assert result.best_value < DIVERGED_OBJECTIVE


@pytest.mark.slow
def test_a_sweep_into_a_shared_server_works_like_the_embedded_store(tmp_path):
    write_cases(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "mlflow_server.py"),
            "--port",
            str(port),
            "--dir",
            str(tmp_path / "srv"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )
    try:
        assert server.stdout.readline().startswith(f"ready http://127.0.0.1:{port}")
        uri = f"http://127.0.0.1:{port}"
        done = run_sweep(tmp_path, "experiment=ok0,ok1,corrupt", store=uri)
        assert done.returncode == 1, done.stderr[-3000:]
        parent, children = split(all_runs(uri))
        assert outcomes(children) == ["completed", "completed", "failed"]
        assert parent.data.tags["bpexp.summary"] == "3 jobs: 2 completed, 1 failed"
        client = MlflowClient(uri)
        assert {"config.yaml", "dynamics.parquet"} <= {
            a.path for a in client.list_artifacts(children[0].info.run_id)
        } | {a.path for a in client.list_artifacts(children[1].info.run_id)}
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
