"""Integration: a real small sweep (train() a few times into SQLite under tmp_path), then the report."""

import subprocess
import sys

import pandas as pd
import pytest
from conftest import cli_env, make_config
from matplotlib.collections import PathCollection
from mlflow.tracking import MlflowClient

from bpexp import analysis, report, store
from bpexp.train import train

SWEEP = "test-sweep"
REQUIRED = ["init_profile", "grad_heatmap", "loss_vs_depth", "update_ratio"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 depths × 2 activations × 2 seeds, plus one run that diverges, linked to a parent run.

    Until the Hydra sweep callback lands, the parent run is made here and the children are linked
    after the fact with the same tags the callback sets (mlflow.parentRunId, bpexp.sweep).
    """
    root = tmp_path_factory.mktemp("sweep")
    store = f"sqlite:///{root}/mlflow.db"
    common = [
        f"tracking.uri={store}",
        "data=teacher",
        "train.steps=20",
        "probes.every=5",
        "train.eval_every=5",
    ]
    run_ids = []
    for depth in (2, 6):
        for activation, init in (("tanh", "xavier_normal"), ("relu", "normal")):
            for seed in (0, 1):
                cfg = make_config(
                    *common,
                    f"model.depth={depth}",
                    f"model.activation={activation}",
                    f"model.init={init}",
                    f"seed={seed}",
                )
                run_ids.append(train(cfg, launch_dir=root, out_dir=root / f"run{len(run_ids)}").run_id)
    cfg = make_config(*common, "model.depth=6", "optim=sgd", "optim.lr=1e4")
    diverged = train(cfg, launch_dir=root, out_dir=root / "diverged")
    assert diverged.outcome == "diverged"
    run_ids.append(diverged.run_id)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bpexp")
    parent = client.create_run(experiment.experiment_id, run_name="sweep", tags={"bpexp.sweep": SWEEP})
    for run_id in run_ids:
        client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)
        client.set_tag(run_id, "bpexp.sweep", SWEEP)
    client.set_terminated(parent.info.run_id)
    return {"root": root, "store": store, "parent": parent.info.run_id, "run_ids": run_ids}


@pytest.fixture(scope="module")
def built(sweep):
    return report.build_report(SWEEP, tracking_uri=sweep["store"], out_dir=sweep["root"] / "reports")


def test_every_figure_is_a_non_empty_png_logged_to_the_parent(sweep, built):
    assert built.directory == sweep["root"] / "reports" / SWEEP and built.logged_to == sweep["parent"]
    expected = REQUIRED + (["theory"] if "theory/delta_log10_ratio" in built.runs else [])
    assert sorted(built.figures) == sorted(expected)
    for path in built.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    text = built.markdown.read_text()
    for path in built.figures.values():
        assert f"]({path.name})" in text
    logged = {a.path for a in MlflowClient(sweep["store"]).list_artifacts(sweep["parent"], "report")}
    assert {
        f"report/{p.name}" for p in [built.markdown, *built.figures.values(), *built.tables.values()]
    } <= logged


def test_the_report_tables_match_load_runs(sweep, built):
    runs = store.load_runs("bpexp", sweep=SWEEP, tracking_uri=sweep["store"])
    assert sorted(runs["run_id"]) == sorted(sweep["run_ids"])
    table = pd.read_csv(built.tables["runs"])
    assert table["run_id"].tolist() == runs["run_id"].tolist()
    for column in ("run_name", "outcome", "diagnosis", "seed"):
        assert table[column].tolist() == runs[column].tolist()
    assert table.loc[table["outcome"] == "diverged", "diverged_step"].notna().all()
    text = built.markdown.read_text()
    assert all(name in text for name in runs["run_name"])

    configs = pd.read_csv(built.tables["configs"])
    by = analysis.config_columns(runs)
    assert {"model.depth", "model.activation", "model.init"} <= set(by) and "seed" not in by
    assert configs["rank"].tolist() == list(range(1, len(configs) + 1))
    assert configs["n_runs"].sum() == len(runs) and len(configs) == 5
    counts = runs.groupby(by, dropna=False).agg(
        n=("run_id", "size"), diverged=("outcome", lambda o: (o == "diverged").sum())
    )
    assert sorted(counts["n"]) == sorted(configs["n_runs"])
    assert configs["diverged"].tolist()[-1] == 1 and configs["diverged"].sum() == counts["diverged"].sum()
    for _, row in configs.iterrows():  # each ranked config's counts are load_runs' counts
        match = runs
        for column in ("model.depth", "model.activation", "optim.name"):
            match = match[match[column] == row[column]]
        assert len(match) == row["n_runs"] and (match["outcome"] == "completed").sum() == row["completed"]
        assert f"| {row['rank']} | {row['config']} | {row['n_runs']} |" in text


def test_summary_numbers_agree_with_the_logged_metrics(built):
    s = built.summary.set_index("run_id")
    done = s[s["outcome"] == "completed"]
    # measured at step 0 by the probes, recomputed here from the per-layer norms of the Parquet file
    metric = store.load_dynamics(built.runs, quantities=["delta/log10_ratio"])
    first = metric[metric["step"] == 0].set_index("run_id")["value"]
    assert done["delta_log10_ratio_init"].to_numpy() == pytest.approx(
        first.loc[done.index].to_numpy(), abs=1e-9
    )
    assert done["final_val_loss"].to_numpy() == pytest.approx(done["val/loss"].to_numpy())


def test_the_shown_runs_span_the_diagnoses(built):
    shown = built.summary.set_index("run_id").loc[built.shown]
    assert 1 <= len(shown) <= 4 and shown["config"].is_unique
    assert "diverged" in set(built.summary["diagnosis"])  # the fixture's sweep has one diverging run
    assert "diverged" in set(shown["diagnosis"])  # and it is among those drawn


@pytest.mark.slow
def test_cli_reads_the_store_of_the_working_directory(sweep):
    cmd = [sys.executable, "-m", "bpexp.report", "latest", "--no-log"]
    done = subprocess.run(cmd, cwd=sweep["root"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"report of sweep {SWEEP}: 9 runs, 5 configs" in done.stdout
    for name in REQUIRED:
        assert (sweep["root"] / "reports" / SWEEP / f"{name}.png").stat().st_size > 0
    missing = subprocess.run(
        [*cmd[:3], "no-such-sweep", "--tracking-uri", sweep["store"]],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "sweeps there: test-sweep" in missing.stderr


def test_report_labels_name_the_swept_values_only(built):
    # the diverging run swaps Adam for SGD at lr=1e4: its label says so with `optim=sgd`, not name= lr=
    labels = built.configs["config"].tolist()
    assert any("optim=sgd" in label for label in labels)
    assert not [label for label in labels if "name=" in label or "lr=" in label]


# -- figures from hand-made summaries (what a study sweeps, answered by the chart) -----------------


def he_init_summary(depths=(30,)) -> pd.DataFrame:
    """experiment=he_init: init × optim (each optimizer with its own lr) × 2 seeds, depth fixed."""
    rows = []
    for depth in depths:
        for optim, lr in (("momentum", 0.01), ("adam", 0.001)):
            for i, init in enumerate(("kaiming_normal", "lecun_normal", "xavier_normal", "normal")):
                for seed in (0, 1):
                    rows.append(
                        {
                            "run_id": f"{depth}-{optim}-{init}-{seed}",
                            "run_name": f"model.init={init} optim={optim} experiment=he_init · long-{seed}",
                            "seed": seed,
                            "model.depth": depth,
                            "model.init": init,
                            "optim.name": optim,
                            "optim.lr": lr,
                            "final_val_loss": 0.1 * (i + 1) + 0.01 * seed,
                            "diverged": False,
                            "outcome": "completed",
                            "diagnosis": "healthy",
                        }
                    )
    summary = pd.DataFrame(rows)
    summary["config"] = analysis.config_label(summary, analysis.config_columns(summary)).to_numpy()
    return summary


def texts(ax) -> list[str]:
    legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    return [ax.get_title(), ax.get_xlabel(), *legend, *(t.get_text() for t in ax.get_xticklabels())]


def test_a_fixed_depth_study_gets_bars_per_config_with_the_spread_over_seeds():
    summary = he_init_summary()
    fig = report.loss_depth_figure(summary, analysis.config_columns(summary))
    left = fig.axes[0]
    assert len(left.patches) == 8  # 4 inits × 2 optimizers, one bar each
    inits = ["kaiming_normal", "lecun_normal", "normal", "xavier_normal"]
    assert [t.get_text() for t in left.get_xticklabels()] == inits and left.get_xlabel() == "init"
    assert left.get_legend().get_title().get_text() == "optim"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["adam", "momentum"]
    dots = [c for c in left.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == 16  # every run a dot on its bar
    assert "depth 30" in left.get_title()
    assert not [t for ax in fig.axes for t in texts(ax) if "lr=" in t or "name=" in t]


def test_a_study_over_depth_gets_lines_against_depth():
    summary = he_init_summary(depths=(2, 8))
    fig = report.loss_depth_figure(summary, analysis.config_columns(summary))
    left = fig.axes[0]
    assert not left.patches and left.get_xlabel() == "depth (hidden layers)"
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        f"init={init} optim={optim}"
        for init in ("kaiming_normal", "lecun_normal", "normal", "xavier_normal")
        for optim in ("adam", "momentum")
    ]
    assert all(list(line.get_xdata()) == [2, 8] for line in left.lines)


def test_heatmap_panels_are_titled_by_the_swept_values():
    summary = he_init_summary()
    shown = summary["run_id"].iloc[[0, 6]].tolist()
    dynamics = pd.DataFrame(
        [
            {"run_id": run_id, "step": step, "layer": layer, "quantity": "grad_norm", "value": 10.0**-layer}
            for run_id in shown
            for step in (0, 5)
            for layer in (1, 2, 3)
        ]
    )
    fig = report.heatmap_figure(summary, dynamics, shown)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [
        "init=kaiming_normal optim=momentum seed=0\ncompleted, healthy",
        "init=normal optim=momentum seed=0\ncompleted, healthy",
    ]


def test_configs_that_do_not_form_a_grid_get_one_bar_each():
    summary = he_init_summary()
    summary = summary[~((summary["model.init"] == "normal") & (summary["optim.name"] == "adam"))]
    left = report.loss_depth_figure(summary, analysis.config_columns(summary)).axes[0]
    ticks = [t.get_text().replace("\n", " ") for t in left.get_xticklabels()]
    assert len(left.patches) == 7 and sorted(ticks) == sorted(set(summary["config"]))
    assert "init=normal optim=momentum" in ticks and left.get_legend() is None


def test_the_ranked_configs_give_the_delta_ratio_and_the_loss_with_their_ci_over_seeds():
    """experiment=seeds_at_scale's question: how sure is a config's δ ratio and loss, over its seeds?"""
    summary = he_init_summary().assign(delta_log10_ratio_init=lambda f: -0.5 * f["seed"] - f.index % 3)
    summary["best_val_loss"] = summary["final_val_loss"]
    configs = analysis.rank_configs(summary)
    table = report.configs_for_markdown(configs)
    for (_, row), cell in zip(configs.iterrows(), table["δ ratio at init"], strict=True):
        runs = summary[summary["config"] == row["config"]]["delta_log10_ratio_init"]
        lo, hi = analysis.bootstrap_ci(runs.to_numpy())
        assert lo < hi and cell == f"{runs.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"
