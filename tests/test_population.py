"""A population member is its lone run: every logged value equal to 1e-9 in float64, outcome included."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import cli, cli_env, make_config

from bpexp.config import ConfigError
from bpexp.population import Population, group_key, train_population
from bpexp.store import load_dynamics, load_runs
from bpexp.train import train

SMALL = ("tracking=none", "train.dtype=float64", "model.depth=2", "model.width=8", "train.batch_size=32")


def lone(cfg, tmp_path):
    """train() as a lone run with tracking=none: its RunResult and the dynamics it wrote."""
    out = tmp_path / f"lone-{cfg.seed}-{cfg.optim.lr}"
    result = train(cfg, out_dir=out)
    return result, pd.read_parquet(out / "dynamics.parquet")


def assert_same_run(cfgs, tmp_path):
    members = train_population(cfgs)
    for cfg, (result, dynamics, _) in zip(cfgs, members, strict=True):
        alone, frame = lone(cfg, tmp_path)
        mine = dynamics.frame()
        assert mine[["step", "layer", "quantity"]].equals(frame[["step", "layer", "quantity"]])
        np.testing.assert_allclose(mine["value"], frame["value"], rtol=1e-9, atol=1e-12)
        assert (result.outcome, result.diagnosis, result.steps) == (
            alone.outcome,
            alone.diagnosis,
            alone.steps,
        )
        assert (result.diverged_step, result.diverged_layer) == (alone.diverged_step, alone.diverged_layer)
        assert list(result.metrics) == list(alone.metrics)
        assert list(result.initial) == list(alone.initial)
        np.testing.assert_allclose(
            list(result.metrics.values()), list(alone.metrics.values()), rtol=1e-9, atol=1e-12
        )
    return members


@pytest.mark.parametrize("engine", ["autograd", "manual"])
@pytest.mark.parametrize("optim", ["sgd", "momentum", "adam", "adamw"])
def test_members_equal_lone_runs_with_dropout(optim, engine, tmp_path):
    shared = (*SMALL, f"optim={optim}", f"train.engine={engine}", "train.steps=50", "probes.every=10")
    cfgs = [
        make_config(*shared, "seed=0", "model.dropout=0.2"),
        make_config(*shared, "seed=1", "model.dropout=0.0", "model.init_gain=1.5", "optim.lr=0.003"),
        make_config(*shared, "seed=2", "model.dropout=0.1", "optim.weight_decay=0.01", "optim.clip_norm=0.3"),
    ]
    assert_same_run(cfgs, tmp_path)


def test_members_equal_lone_runs_with_batchnorm(tmp_path):
    shared = (*SMALL, "optim=adam", "model.norm=batchnorm", "train.steps=50", "probes.every=10")
    cfgs = [make_config(*shared, "seed=0"), make_config(*shared, "seed=5", "optim.lr=0.01")]
    assert_same_run(cfgs, tmp_path)


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_only_the_member_driven_to_diverge_diverges(engine, tmp_path):
    shared = (*SMALL, "data=gaussian", "model.activation=identity", "optim=sgd", f"train.engine={engine}")
    cfgs = [
        make_config(*shared, "train.steps=30", "seed=0"),
        make_config(*shared, "train.steps=30", "seed=3", "optim.lr=0.5"),
        make_config(*shared, "train.steps=30", "seed=4"),
    ]
    members = assert_same_run(cfgs, tmp_path)
    outcomes = [result.outcome for result, _, _ in members]
    assert outcomes == ["completed", "diverged", "completed"]
    diverged = members[1][0]
    assert diverged.diverged_step is not None and diverged.steps == diverged.diverged_step
    assert members[0][0].steps == members[2][0].steps == 30  # the others trained on


def test_group_key_separates_shapes_and_joins_numbers():
    base = make_config(*SMALL)
    assert group_key(base) == group_key(make_config(*SMALL, "seed=7", "optim.lr=0.1", "model.dropout=0.3"))
    assert group_key(base) != group_key(make_config(*SMALL, "model.width=9"))
    assert group_key(base) != group_key(make_config(*SMALL, "optim=sgd"))
    with pytest.raises(ValueError, match="group_key"):
        Population([base, make_config(*SMALL, "model.depth=3")])


def test_manual_engine_refuses_batchnorm_as_a_lone_run_does():
    cfg = make_config(*SMALL, "train.engine=manual", "model.norm=batchnorm")
    with pytest.raises(ConfigError, match=r"train\.engine=manual"):
        Population([cfg])


SWEEP = (
    "train.dtype=float64",
    "train.steps=12",
    "probes.every=4",
    "train.eval_every=6",
    "model.depth=2",
    "model.width=8",
)


def sweep(tmp_path, launcher: str, experiment: str) -> subprocess.CompletedProcess:
    args = [*SWEEP, "seed=0,1", "optim.lr=0.001,0.003", f"tracking.experiment={experiment}"]
    return subprocess.run(
        cli("-m", f"hydra/launcher={launcher}", *args, f"hydra.sweep.dir={tmp_path}/{launcher}"),
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_batched_sweep_records_the_runs_a_basic_sweep_records(tmp_path):
    """Same sweep, both launchers, one store: load_runs and load_dynamics give the same frames (float64:
    in float32, baddbmm and addmm round differently, so members agree to float32 rounding only)."""
    basic, batched = sweep(tmp_path, "basic", "lone"), sweep(tmp_path, "batched", "population")
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert batched.returncode == 0, batched.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lone, population = load_runs("lone", tracking_uri=uri), load_runs("population", tracking_uri=uri)
    assert len(population) == 4 and population["parent_run_id"].nunique() == 1
    assert set(population["status"]) == {"FINISHED"}
    assert population["population"].nunique() == 1 and set(population["population_size"]) == {"4"}
    differ = ["run_id", "start_time", "duration_s", "experiment_id", "artifact_uri", "parent_run_id"]
    differ += ["sweep", "job_dir", "population", "population_size", "run_name", "tracking.experiment"]
    differ += ["tracking.run_name"]  # names lead with the overrides, which name the experiment
    differ += ["train.threads"]  # a population takes every core (hydra.launcher.threads=0), and says so
    by_job = lambda frame: frame.sort_values("job").reset_index(drop=True)  # noqa: E731
    expected = by_job(lone).drop(columns=differ, errors="ignore")
    got = by_job(population).drop(columns=differ, errors="ignore")
    pd.testing.assert_frame_equal(got[expected.columns], expected, rtol=1e-9)
    assert list(got.columns) == list(expected.columns)
    lone_dynamics = load_dynamics(by_job(lone)).drop(columns="run_id")
    population_dynamics = load_dynamics(by_job(population)).drop(columns="run_id")
    pd.testing.assert_frame_equal(population_dynamics, lone_dynamics, rtol=1e-9)
