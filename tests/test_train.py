"""Integration: the real composed config, a few steps, a real SQLite store under tmp_path."""

import math

import pandas as pd
import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient

from bpexp.train import DIVERGED_OBJECTIVE, train

PER_LAYER = ["grad_norm", "grad_norm_b", "delta_norm", "weight_norm", "update_ratio", "act_mean", "act_std"]
NETWORK = ["grad_norm/total", "delta/log10_ratio", "delta/slope", "grad/log10_ratio", "grad/slope"]


def only_run(store: str):
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bpexp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, experiment, runs[0]


def test_a_run_leaves_every_metric_param_tag_and_artifact(tmp_path, store):
    cfg = make_config(f"tracking.uri={store}", "train.steps=10", "probes.every=5", "data=digits")
    result = train(cfg, launch_dir=tmp_path, out_dir=tmp_path / "out")
    client, experiment, run = only_run(store)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED" and run.info.run_id == result.run_id
    assert run.data.tags["bpexp.outcome"] == "completed"
    assert run.data.tags["bpexp.diagnosis"] in {
        "healthy",
        "vanishing",
        "exploding",
        "saturated",
        "dead_units",
    }
    L = 4
    expected = {f"{q}/l{l:03d}" for q in PER_LAYER for l in range(1, L + 1)}
    expected |= {f"dead/l{l:03d}" for l in range(1, L)}
    expected |= {*NETWORK, "train/loss", "train/acc", "val/loss", "val/acc"}
    assert expected <= set(run.data.metrics)
    assert run.data.params["model.depth"] == "3" and run.data.params["model.activation"] == "relu"
    assert run.data.params["optim.clip_norm"] == "null" and run.data.params["data.name"] == "digits"
    assert float(run.data.params["theory.chi1"]) == pytest.approx(1.0)  # ReLU, Kaiming: σ_w²/2 = 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "theory/delta_log10_ratio")] == [0]
    assert run.data.tags["bpexp.theory"] in {"agrees", "differs"} and "bpexp.diagnosis_init" in run.data.tags
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dynamics.parquet", "plots"} <= names
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/gradient_profile.png"]

    # The Parquet table and MLflow hold the same numbers: probes at steps 0, 5, 10.
    dynamics = pd.read_parquet(tmp_path / "out" / "dynamics.parquet")
    delta = dynamics[(dynamics.quantity == "delta_norm") & (dynamics.layer == 2)]
    history = client.get_metric_history(run.info.run_id, "delta_norm/l002")
    assert delta.step.tolist() == [m.step for m in history] == [0, 5, 10]
    assert delta.value.tolist() == pytest.approx([m.value for m in history])
    assert dynamics[dynamics.quantity == "update_ratio"].step.max() == 5  # no update after the last step


def test_same_seed_gives_bit_identical_dynamics(tmp_path):
    frames = []
    for i in range(2):
        cfg = make_config("tracking=none", "model.dropout=0.2", "train.batch_size=32", "data=spirals")
        train(cfg, out_dir=tmp_path / str(i))
        frames.append(pd.read_parquet(tmp_path / str(i) / "dynamics.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)
    other = make_config("tracking=none", "model.dropout=0.2", "train.batch_size=32", "data=spirals", "seed=1")
    train(other, out_dir=tmp_path / "other")
    assert not frames[0].equals(pd.read_parquet(tmp_path / "other" / "dynamics.parquet"))


def test_divergence_is_an_outcome_not_a_crash(tmp_path, store):
    cfg = make_config(f"tracking.uri={store}", "optim=sgd", "optim.lr=1e4", "data=teacher", "train.steps=50")
    result = train(cfg, launch_dir=tmp_path, out_dir=tmp_path / "out")
    assert result.outcome == "diverged" and result.diagnosis == "diverged"
    assert result.objective == DIVERGED_OBJECTIVE and math.isfinite(result.objective)
    _, _, run = only_run(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["bpexp.outcome"] == "diverged"
    assert int(run.data.tags["bpexp.diverged_step"]) == result.diverged_step < 50
    assert 1 <= int(run.data.tags["bpexp.diverged_layer"]) <= 4
    assert all(math.isfinite(v) for v in run.data.metrics.values())  # NaN/inf break MLflow's run page


def test_zero_steps_probes_at_initialization(tmp_path, store):
    cfg = make_config(f"tracking.uri={store}", "train.steps=0", "data=gaussian", "model.depth=8")
    result = train(cfg, launch_dir=tmp_path, out_dir=tmp_path / "out")
    assert result.steps == 0 and result.outcome == "completed"
    dynamics = pd.read_parquet(tmp_path / "out" / "dynamics.parquet")
    assert set(dynamics.step) == {0} and dynamics.layer.max() == 9
    assert "update_ratio" not in set(dynamics.quantity)
    assert only_run(store)[2].info.status == "FINISHED"


@pytest.mark.parametrize("optim", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"])
def test_every_optimizer_learns_something(optim):
    cfg = make_config(
        "tracking=none", f"optim={optim}", "data=blobs", "train.steps=30", "model.norm=batchnorm"
    )
    result = train(cfg)
    assert result.outcome == "completed"
    assert result.metrics["val/loss"] < math.log(5)  # below chance for 5 classes


@pytest.mark.parametrize(
    "override",
    [
        "optim.schedule=cosine",
        "optim.schedule=step",
        "optim.clip_norm=0.01",
        "train.dtype=float64",
        "model.norm=layernorm",
        "model.residual=true",
        "probes=off",
        "train.batch_size=null",
    ],
)
def test_options_run_end_to_end(override):
    result = train(make_config("tracking=none", "data=teacher", override))
    assert result.outcome == "completed" and math.isfinite(result.metrics["val/loss"])
    assert ("delta/log10_ratio" in result.metrics) == (override != "probes=off")


def test_a_failure_is_recorded_failed_with_its_traceback(tmp_path, store, monkeypatch):
    import bpexp.train as loop

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the optimizer")

    monkeypatch.setattr(loop, "clip_gradients", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(make_config(f"tracking.uri={store}"), launch_dir=tmp_path, out_dir=tmp_path / "out")
    client, _, run = only_run(store)
    assert run.info.status == "FAILED" and run.data.tags["bpexp.outcome"] == "failed"
    assert "traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_manual_engine_follows_autograd_to_1e_9_in_float64(tmp_path):
    common = [
        "tracking=none",
        "optim=sgd",
        "optim.lr=0.05",
        "train.steps=50",
        "probes.every=1",
        "train.dtype=float64",
        "data=teacher",
        "model.activation=tanh",
        "model.init=xavier_normal",
    ]
    frames = {}
    for engine in ("autograd", "manual"):
        train(make_config(*common, f"train.engine={engine}"), out_dir=tmp_path / engine)
        frames[engine] = pd.read_parquet(tmp_path / engine / "dynamics.parquet").set_index(
            ["step", "layer", "quantity"]
        )
    curve = {e: f.xs("train/loss", level="quantity")["value"].to_numpy() for e, f in frames.items()}
    assert len(curve["manual"]) == 51 and curve["manual"][-1] < curve["manual"][0]
    assert curve["manual"] == pytest.approx(curve["autograd"], rel=1e-9)
    # the δ that the probes log is the same quantity backprop.py computes by hand
    delta = {e: f.xs("delta_norm", level="quantity")["value"].to_numpy() for e, f in frames.items()}
    assert delta["manual"] == pytest.approx(delta["autograd"], rel=1e-9)


def test_gradcheck_stays_small_in_float32_over_a_run(tmp_path):
    cfg = make_config(
        "tracking=none",
        "probes.gradcheck_every=5",
        "train.steps=30",
        "data=spirals",
        "model.activation=gelu",
        "model.dropout=0.1",
    )
    result = train(cfg, out_dir=tmp_path)
    checks = pd.read_parquet(tmp_path / "dynamics.parquet").query("quantity == 'gradcheck/max_rel_err'")
    assert checks.step.tolist() == [0, 5, 10, 15, 20, 25, 30]
    assert 0 < checks.value.max() <= 1e-4 and result.outcome == "completed"


def test_manual_engine_refuses_normalization_layers():
    with pytest.raises(ValueError, match=r"train.engine=manual cannot run model.norm=batchnorm"):
        train(make_config("tracking=none", "train.engine=manual", "model.norm=batchnorm"))
