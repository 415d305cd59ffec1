"""A population member is its lone run: every logged value equal to 1e-9 in float64, outcome included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from bpexp.config import ConfigError
from bpexp.population import Population, group_key, train_population
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
