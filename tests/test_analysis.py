"""Unit: analysis functions on hand-made tables whose answers are checked by hand; loaders on a
hand-made SQLite store under tmp_path (no training)."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from bpexp import store
from bpexp.analysis import (
    aggregate,
    bootstrap_ci,
    config_columns,
    config_label,
    label_columns,
    pivot,
    rank_configs,
    summarize,
)
from bpexp.names import profile, split_key
from bpexp.store import load_dynamics, load_runs, local_artifact_dir, parse_param

ROOT = Path(__file__).resolve().parents[1]


# -- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("null", None),
        ("true", True),
        ("false", False),
        ("3", 3),
        ("-2", -2),
        ("0.001", 0.001),
        ("1e-05", 1e-05),  # str(1e-05): YAML 1.1 would keep this a string
        ("1E5", 1e5),
        ("inf", math.inf),
        ("relu", "relu"),
        ("no", "no"),  # YAML 1.1 would make this False
        ("[0.9, 0.999]", (0.9, 0.999)),
        ("[]", ()),
        ("None", None),
        ("True", True),
        ("2024-01-01", "2024-01-01"),
        ('{"a": 1}', '{"a": 1}'),
    ],
)
def test_param_strings_read_back_as_values(text, value):
    parsed = parse_param(text)
    assert parsed == value and type(parsed) is type(value)


def test_param_columns_take_the_narrowest_dtype():
    raw = pd.DataFrame(
        {
            "model.depth": ["2", "8", None],
            "optim.lr": ["0.1", "1", "1e-05"],
            "optim.clip_norm": ["null", "0.5", "null"],
            "model.residual": ["true", "false", "null"],
            "model.activation": ["relu", "tanh", "relu"],
            "optim.betas": ["[0.9, 0.999]", "[0.5, 0.9]", "[0.9, 0.999]"],
            "mixed": ["1", "relu", "null"],
        },
        dtype=object,
    )
    typed = store.typed_params(raw)
    assert str(typed["model.depth"].dtype) == "Int64" and typed["model.depth"].tolist()[:2] == [2, 8]
    assert typed["model.depth"].isna().tolist() == [False, False, True]
    assert typed["optim.lr"].dtype == np.float64 and typed["optim.lr"].tolist() == [0.1, 1.0, 1e-05]
    assert typed["optim.clip_norm"].dtype == np.float64 and typed["optim.clip_norm"].isna().sum() == 2
    assert str(typed["model.residual"].dtype) == "boolean"
    assert typed["model.residual"].tolist()[:2] == [True, False] and pd.isna(typed["model.residual"][2])
    assert typed["model.activation"].tolist() == ["relu", "tanh", "relu"]
    assert typed["optim.betas"].nunique() == 2  # tuples: hashable, so they can be group keys
    assert typed["mixed"].tolist()[:2] == [1, "relu"] and typed["mixed"][2] is None


def test_config_columns_are_the_varying_params_but_not_seed_tracking_or_theory():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "seed": [0, 1, 0, 1],
            "model.depth": [2, 2, 8, 8],
            "model.activation": ["relu"] * 4,
            "optim.name": ["adam", "adam", "adam", "sgd"],
            "theory.chi1": [0.5, 0.5, 2.0, 2.0],
            "tracking.uri": ["x", "y", "x", "y"],
            "val/loss": [1.0, 2.0, 3.0, 4.0],
            "outcome": ["completed", "diverged", "completed", "completed"],
        }
    )
    assert config_columns(runs) == ["model.depth", "optim.name"]
    assert config_label(runs).tolist()[-1] == "depth=8 optim=sgd"
    clash = runs.assign(**{"data.width": [1, 2, 1, 2], "model.width": [3, 3, 4, 4]})
    assert config_label(clash, ["data.width", "model.width"])[0] == "data.width=1 model.width=3"


def test_labels_name_the_swept_values_only():
    """experiment=he_init sweeps model.init × optim; each optimizer brings its own lr and momentum."""
    inits = ["kaiming_normal", "lecun_normal", "xavier_normal", "normal"]
    runs = pd.DataFrame(
        {
            "model.init": inits * 2,
            "optim.name": ["momentum"] * 4 + ["adam"] * 4,
            "optim.lr": [0.01] * 4 + [0.001] * 4,
            "optim.momentum": [0.9] * 4 + [0.0] * 4,
        }
    )
    by = config_columns(runs)
    assert label_columns(runs, by) == ["model.init", "optim.name"]
    assert config_label(runs, by)[4] == "init=kaiming_normal optim=adam"
    # a search draws η and σ_w afresh per trial: one fixes the other only trivially, both stay
    search = pd.DataFrame({"optim.lr": [0.1, 0.01, 0.003], "model.init_gain": [1.0, 1.5, 2.0]})
    assert config_label(search)[1] == "lr=0.01 init_gain=1.5"
    # swept independently, an optimizer's lr is a swept value of its own
    grid = pd.DataFrame({"optim.name": ["sgd", "sgd", "adam", "adam"], "optim.lr": [0.1, 0.01] * 2})
    assert config_label(grid).tolist()[1:3] == ["optim=sgd lr=0.01", "optim=adam lr=0.1"]


# -- profiles and summaries ---------------------------------------------------------------------


def test_profile_of_a_geometric_signal_is_its_ratio_and_slope():
    # ‖δ^(l)‖ = 10^(2l - 8), l = 1..3: it grows by 2 decades per layer toward the output, so it
    # vanishes by 4 decades from layer 3 back to layer 1.
    ratio, slope = profile([1e-6, 1e-4, 1e-2])
    assert ratio == pytest.approx(-4) and slope == pytest.approx(2)
    assert profile([3.0, 3.0, 3.0, 3.0]) == pytest.approx((0.0, 0.0))
    assert profile([1.0]) == (0.0, 0.0)
    # not collinear: logs 0, -1, 0 -> slope 0, ratio 0; logs 0, 0, -3 -> slope -1.5
    assert profile([1.0, 0.1, 1.0]) == pytest.approx((0.0, 0.0))
    assert profile([1.0, 1.0, 1e-3]) == pytest.approx((3.0, -1.5))


def long_rows(run_id, step, quantity, values):
    """One probe's per-layer rows, and its logged ratio and slope as the probes log them."""
    rows = [(run_id, step, l, quantity, v) for l, v in enumerate(values, start=1)]
    prefix = quantity.removesuffix("_norm")
    with np.errstate(invalid="ignore"):
        ratio, slope = profile(values)
    return [
        *rows,
        (run_id, step, None, f"{prefix}/log10_ratio", ratio),
        (run_id, step, None, f"{prefix}/slope", slope),
    ]


def frame(rows):
    df = pd.DataFrame(rows, columns=["run_id", "step", "layer", "quantity", "value"])
    df["layer"] = df["layer"].astype("Int64")
    return df


def hand_made_sweep():
    """Two runs: 'a' completed, 'b' diverged at step 30 (no tag: only the diverged/step metric)."""
    rows = []
    rows += long_rows("a", 0, "delta_norm", [1e-3, 1e-2, 1e-1])  # ratio -2, slope +1
    rows += long_rows("a", 0, "grad_norm", [1.0, 1.0, 1.0])
    rows += long_rows("a", 20, "delta_norm", [1.0, 1.0, 1.0])
    rows += long_rows("a", 20, "grad_norm", [1e-2, 1.0, 1e2])  # ratio -4, slope +2
    rows += long_rows("b", 0, "delta_norm", [1e2, 1e1, 1.0])  # ratio +2, slope -1
    rows += long_rows("b", 0, "grad_norm", [1.0, 1.0, 1.0])
    rows += long_rows("b", 20, "grad_norm", [1.0, 10.0, 1.0])  # ratio 0, slope 0
    rows += long_rows("b", 30, "grad_norm", [np.inf, np.nan, 1.0])
    rows += [("a", s, None, "val/loss", v) for s, v in [(0, 1.0), (10, 0.5), (20, 0.7)]]
    rows += [("b", s, None, "val/loss", v) for s, v in [(0, 1.0), (10, 0.8), (20, 0.9), (30, np.nan)]]
    rows += [("b", 30, None, "diverged/step", 30.0)]
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "outcome": ["completed", "diverged"],
            "diagnosis": ["vanishing", "diverged"],
            "diverged_step": pd.array([None, None], dtype="Int64"),
            "model.depth": [2, 2],
        }
    )
    return runs, frame(rows)


def test_summary_reads_init_end_losses_and_divergence_by_hand():
    runs, dynamics = hand_made_sweep()
    s = summarize(runs, dynamics).set_index("run_id")
    a, b = s.loc["a"], s.loc["b"]
    assert (a.delta_log10_ratio_init, a.delta_slope_init, a.delta_gain_init) == pytest.approx((-2, 1, 10))
    assert (a.delta_log10_ratio_end, a.delta_slope_end) == pytest.approx((0, 0))
    assert (a.grad_log10_ratio_init, a.grad_log10_ratio_end, a.grad_slope_end) == pytest.approx((0, -4, 2))
    assert (a.init_step, a.end_step) == (0, 20)
    assert (a.final_val_loss, a.best_val_loss, a.best_val_step) == (0.7, 0.5, 10)
    assert not a.diverged and pd.isna(a.diverged_step)
    assert (b.delta_log10_ratio_init, b.delta_slope_init, b.delta_gain_init) == pytest.approx((2, -1, 0.1))
    assert b.end_step == 20  # step 30 holds inf/nan: the last complete profile is step 20
    assert b.grad_log10_ratio_end == pytest.approx(0) and b.grad_slope_end == pytest.approx(0)
    assert b.diverged and b.diverged_step == 30
    assert math.isnan(b.final_val_loss) and (b.best_val_loss, b.best_val_step) == (0.8, 10)


# -- across runs --------------------------------------------------------------------------------


def test_bootstrap_ci_by_hand():
    # Two values 0 and 1: a resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([5.0]))
    assert all(math.isnan(v) for v in bootstrap_ci([5.0, np.nan]))  # NaN dropped: one value left
    assert bootstrap_ci([1.0, 2.0, 3.0], seed=1) == bootstrap_ci([1.0, 2.0, 3.0], seed=1)
    # Many values: close to the normal-theory interval mean ± 1.96 σ/√n.
    x = np.random.default_rng(0).normal(10, 2, 400)
    lo, hi = bootstrap_ci(x, n_boot=20_000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)
    lo90, hi90 = bootstrap_ci(x, ci=0.9)
    assert lo < lo90 < hi90 < hi


def seeds_table():
    """Configs (depth, activation, init) × seeds; NaN final loss = a diverged run."""
    rows = [
        # depth, activation, init, seed, final, diverged, diagnosis
        (2, "relu", "he", 0, 1.0, False, "healthy"),
        (2, "relu", "he", 1, 2.0, False, "healthy"),
        (2, "relu", "he", 2, 3.0, False, "vanishing"),
        (2, "tanh", "he", 0, np.nan, True, "diverged"),
        (2, "tanh", "he", 1, 4.0, False, "healthy"),
        (8, "relu", "he", 0, 0.5, False, "healthy"),
        (8, "relu", "he", 1, 0.7, False, "healthy"),
        (8, "tanh", "xavier", 0, np.nan, True, "diverged"),
        (8, "tanh", "xavier", 1, np.nan, True, "diverged"),
    ]
    df = pd.DataFrame(
        rows,
        columns=[
            "model.depth",
            "model.activation",
            "model.init",
            "seed",
            "final_val_loss",
            "diverged",
            "diagnosis",
        ],
    )
    df["outcome"] = np.where(df["diverged"], "diverged", "completed")
    df["best_val_loss"] = df["final_val_loss"].fillna(9.0)
    df["delta_log10_ratio_init"] = -df["model.depth"] / 2
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    return df


def test_aggregate_over_seeds_by_hand():
    table = aggregate(seeds_table(), ["model.depth", "model.activation"], "final_val_loss").set_index(
        ["model.depth", "model.activation"]
    )
    relu2 = table.loc[(2, "relu")]
    assert (relu2.n_runs, relu2.final_val_loss_n, relu2.share_diverged) == (3, 3, 0.0)
    assert (relu2.final_val_loss_mean, relu2.final_val_loss_median) == (2.0, 2.0)
    assert 1.0 <= relu2.final_val_loss_lo < 2.0 < relu2.final_val_loss_hi <= 3.0
    tanh2 = table.loc[(2, "tanh")]  # one diverged, one left: a mean but no interval
    assert (tanh2.n_runs, tanh2.final_val_loss_n, tanh2.share_diverged, tanh2.final_val_loss_mean) == (
        2,
        1,
        0.5,
        4.0,
    )
    assert math.isnan(tanh2.final_val_loss_lo) and math.isnan(tanh2.final_val_loss_hi)
    tanh8 = table.loc[(8, "tanh")]
    assert tanh8.share_diverged == 1.0 and math.isnan(tanh8.final_val_loss_mean)
    assert aggregate(seeds_table(), [], "final_val_loss")["n_runs"].tolist() == [9]
    # default grouping: every varying config column but the seed
    assert len(aggregate(seeds_table())) == 4


def test_pivot_depth_by_activation_and_init():
    df = seeds_table()
    median = pivot(df, "model.depth", ["model.activation", "model.init"], "final_val_loss", "median")
    assert median.loc[2, ("relu", "he")] == 2.0 and median.loc[8, ("relu", "he")] == 0.6
    assert median.loc[2, ("tanh", "he")] == 4.0
    assert math.isnan(median.loc[8, ("tanh", "xavier")])  # every run diverged: kept, as NaN
    assert math.isnan(median.loc[2, ("tanh", "xavier")])  # no such run
    share = pivot(df, "model.depth", "model.activation", "diverged", "mean")
    assert share.loc[2, "relu"] == 0 and share.loc[2, "tanh"] == 0.5 and share.loc[8, "tanh"] == 1.0
    count = pivot(df, ["model.depth", "model.activation"], values="run_id", aggfunc="count")
    assert count["run_id"].tolist() == [3, 2, 2, 2]
    nulls = df.assign(**{"optim.clip_norm": [None] * 5 + [1.0] * 4})
    assert pivot(nulls, "optim.clip_norm", values="final_val_loss", aggfunc="count").shape == (2, 1)


def test_configs_rank_by_share_diverged_then_median_loss():
    ranked = rank_configs(seeds_table(), ["model.depth", "model.activation", "model.init"], n_boot=500)
    assert ranked["rank"].tolist() == [1, 2, 3, 4]
    assert ranked["config"].tolist() == [
        "depth=8 activation=relu init=he",  # no divergence, median 0.6
        "depth=2 activation=relu init=he",  # no divergence, median 2.0
        "depth=2 activation=tanh init=he",  # half diverged
        "depth=8 activation=tanh init=xavier",  # all diverged
    ]
    assert ranked["diagnosis"][1] == "healthy ×2, vanishing ×1"
    assert ranked[["n_runs", "completed", "diverged"]].values.tolist() == [
        [2, 2, 0],
        [3, 3, 0],
        [2, 1, 1],
        [2, 0, 2],
    ]
    assert ranked["final_val_loss_median"][0] == pytest.approx(0.6)


# -- loaders on a hand-made store ---------------------------------------------------------------


def log_run(client, exp_id, name, params, tags, metrics, dynamics=None, tmp=None):
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, s) for k, s, v in metrics],
        params=[Param(k, v) for k, v in params.items()],
    )
    if dynamics is not None:
        path = tmp / f"{run_id}.parquet"
        dynamics.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path))  # logged under its own name: rename inside the store
        folder = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
        (folder / path.name).rename(folder / "dynamics.parquet")
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def hand_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("bpexp", (tmp_path / "artifacts").as_uri())
    parent_tags = {"bpexp.sweep": "s1", "bpexp.role": "sweep"}  # as bpexp.sweep tags its parent run
    parent = client.create_run(exp_id, run_name="sweep", tags=parent_tags).info.run_id
    child = {"bpexp.sweep": "s1", "mlflow.parentRunId": parent}
    params = {"model.depth": "3", "model.activation": "tanh", "optim.clip_norm": "null", "optim.lr": "1e-05"}
    series = [(f"grad_norm/l{l:03d}", s, 10.0 ** (l - s)) for s in (0, 5) for l in (1, 2, 3)]
    series += [("val/loss", 0, 2.0), ("val/loss", 5, 1.5), ("delta/log10_ratio", 0, -2.0)]
    dyn = pd.DataFrame(
        {
            "step": pd.array([s for _, s, _ in series], dtype="int64"),
            "layer": pd.array([split_key(k)[1] for k, _, _ in series], dtype="Int64"),
            "quantity": pd.array([split_key(k)[0] for k, _, _ in series], dtype="string"),
            "value": [v for _, _, v in series],
        }
    )
    # The Parquet file holds every value, NaN too (pyarrow writes it as null); MLflow only finite ones.
    nan_row = pd.DataFrame({"step": [10], "layer": pd.array([None], dtype="Int64"), "quantity": ["val/loss"]})
    with_nan = pd.concat(
        [dyn, nan_row.assign(value=np.nan).astype({"quantity": "string"})], ignore_index=True
    )
    ids = {
        "parquet": log_run(
            client,
            exp_id,
            "with-parquet",
            {**params, "seed": "0", "probes.enabled": "true", "theory.chi1": "0.8"},
            {**child, "bpexp.outcome": "completed", "bpexp.diagnosis": "vanishing"},
            series,
            with_nan,
            tmp_path,
        ),
        "history": log_run(
            client,
            exp_id,
            "history-only",
            {**params, "seed": "1", "probes.enabled": "false", "model.depth": "8"},
            {**child, "bpexp.outcome": "diverged", "bpexp.diagnosis": "diverged", "bpexp.diverged_step": "5"},
            series,
        ),
        "other": log_run(client, exp_id, "not-in-sweep", params, {"bpexp.outcome": "completed"}, series[:1]),
    }
    client.set_terminated(parent)
    return uri, parent, ids, dyn


def test_load_runs_types_params_and_keeps_one_row_per_child(hand_store):
    uri, parent, ids, _ = hand_store
    runs = load_runs("bpexp", sweep="s1", tracking_uri=uri)
    assert runs["run_id"].tolist() == [ids["parquet"], ids["history"]]  # parent left out, start order
    assert runs["parent_run_id"].tolist() == [parent, parent] and set(runs["sweep"]) == {"s1"}
    assert runs["outcome"].tolist() == ["completed", "diverged"]
    assert runs["diverged_step"].tolist()[1] == 5 and str(runs["diverged_step"].dtype) == "Int64"
    assert runs["model.depth"].tolist() == [3, 8] and str(runs["model.depth"].dtype) == "Int64"
    assert runs["optim.lr"].tolist() == [1e-05, 1e-05] and runs["optim.clip_norm"].isna().all()
    assert runs["probes.enabled"].tolist() == [True, False]
    assert runs["theory.chi1"][0] == 0.8 and pd.isna(runs["theory.chi1"][1])  # theory where logged
    assert runs["val/loss"].tolist() == [1.5, 1.5] and runs["delta/log10_ratio"][0] == -2.0
    assert "grad_norm/l001" not in runs  # per-layer metrics only on request
    assert "grad_norm/l001" in load_runs("bpexp", sweep="s1", tracking_uri=uri, layer_metrics=True)
    assert runs.attrs["tracking_uri"] == uri and "seed" in runs.attrs["params"]
    assert config_columns(runs) == ["model.depth", "probes.enabled"]
    everything = load_runs("bpexp", tracking_uri=uri)
    assert set(everything["run_id"]) == set(ids.values())
    with_parent = load_runs("bpexp", sweep="s1", tracking_uri=uri, include_parents=True)
    assert parent in set(with_parent["run_id"])
    by_parent = load_runs("bpexp", tracking_uri=uri, parent_run_id=parent)
    assert by_parent["run_id"].tolist() == runs["run_id"].tolist()
    with pytest.raises(LookupError, match=r"experiment='nope'.*bpexp"):
        load_runs("nope", tracking_uri=uri)


def test_a_relaunched_job_counts_once():
    def run(run_id, job, sweep="s1"):
        tags = {"bpexp.sweep": sweep, "mlflow.parentRunId": "p"} | ({"bpexp.job": job} if job else {})
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags))

    runs = [run("a", "0"), run("b", "1"), run("c", "0"), run("d", None), run("e", None), run("f", "0", "s2")]
    assert [r.info.run_id for r in store.latest_runs(runs)] == ["b", "c", "d", "e", "f"]


def test_find_sweep_by_id_parent_or_latest(hand_store):
    uri, parent, ids, _ = hand_store
    for ref in ("s1", parent, "latest", ids["history"]):
        sweep = store.find_sweep(ref, tracking_uri=uri)
        assert (sweep.sweep_id, sweep.parent_run_id) == ("s1", parent)
    with pytest.raises(LookupError, match="sweeps there: s1"):
        store.find_sweep("s2", tracking_uri=uri)


def test_load_dynamics_reads_parquet_and_falls_back_to_metric_history(hand_store):
    uri, _, ids, dyn = hand_store
    runs = load_runs("bpexp", sweep="s1", tracking_uri=uri)
    both = load_dynamics(runs)
    assert both.attrs["sources"] == {"parquet": 1, "history": 1}
    assert list(both.columns) == ["run_id", "step", "layer", "quantity", "value"]
    assert [str(t) for t in both.dtypes] == ["category", "int64", "Int64", "category", "float64"]
    key = ["step", "layer", "quantity"]
    tables = {
        name: both[both["run_id"] == ids[name]][[*key, "value"]].astype({"quantity": str}).sort_values(key)
        for name in ("parquet", "history")
    }
    nan = tables["parquet"]["value"].isna()
    assert nan.sum() == 1 and tables["parquet"][nan][["step", "quantity"]].values.tolist() == [
        [10, "val/loss"]
    ]
    for table in (tables["parquet"][~nan], tables["history"]):
        pd.testing.assert_frame_equal(
            table.reset_index(drop=True),
            dyn.astype({"quantity": str}).sort_values(key).reset_index(drop=True),
            check_dtype=False,
        )
    only = load_dynamics(runs, quantities=["val/loss"])
    assert set(only["quantity"]) == {"val/loss"} and list(only["quantity"].cat.categories) == ["val/loss"]
    assert only["layer"].isna().all() and len(only) == 5
    from_ids = load_dynamics([ids["history"]], tracking_uri=uri, source="history")
    assert len(from_ids) == len(dyn)
    with pytest.raises(FileNotFoundError, match=ids["history"]):
        load_dynamics(runs, source="parquet")
    assert len(load_dynamics(runs.iloc[:0])) == 0


def test_local_artifact_dir():
    assert local_artifact_dir("file:///tmp/a%20b/artifacts") == Path("/tmp/a b/artifacts")
    assert local_artifact_dir("/tmp/mlruns/1/x/artifacts") == Path("/tmp/mlruns/1/x/artifacts")
    assert local_artifact_dir("mlflow-artifacts:/1/x/artifacts") is None
    assert local_artifact_dir("s3://bucket/x") is None


def test_benchmark_runs_small(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_dynamics
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    result = bench_dynamics.benchmark(
        n_runs=3, n_layers=2, n_quantities=2, n_steps=3, history_runs=2, root=tmp_path
    )
    assert result["rows"] == 3 * 2 * 2 * 3 and result["history_rows_match_parquet"]
    assert result["history_extrapolated"] and result["parquet_s"] > 0 and result["history_s"] > 0
    assert "faster" in bench_dynamics.describe(result)


def test_analysis_and_report_import_no_training_code():
    code = (
        "import sys, bpexp.analysis, bpexp.report; "
        "bad = [m for m in ('torch', 'bpexp.train', 'bpexp.model', 'bpexp.probes', 'bpexp.tracking', "
        "'bpexp.data') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    pure = (  # the statistics read DataFrames only: no store, no MLflow
        "import sys, bpexp.analysis; bad = [m for m in ('bpexp.store', 'mlflow', 'torch') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", pure], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
