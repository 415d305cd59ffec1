"""A sweep's report: Markdown, PNG figures and CSV tables in reports/<sweep>/, logged to its parent run.

Over 400 lines: the report's figures are drawn for this report only (its layout, its labels from the
swept values) and sit beside the Markdown that cites them; the reusable plots live in figures.py.

    python -m bpexp.report                  # the latest sweep in ./mlflow.db (or $MLFLOW_TRACKING_URI)
    python -m bpexp.report 20250101-120000  # a sweep id (the bpexp.sweep tag), or its parent run id
    python -m bpexp.report latest --tracking-uri http://localhost:5000 --experiment bpexp

Reads the store through bpexp.store and computes with bpexp.analysis (no training code): runs ->
dynamics -> summaries -> figures. ``build_report`` does the work and returns a Report; ``main`` is the
command line.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from bpexp import analysis, store, studies
from bpexp.console import count
from bpexp.figures import (
    bars_with_ci,
    config_profiles,
    layer_lines,
    layer_step_heatmap,
    lines_with_bands,
    measured_vs_predicted,
)
from bpexp.names import Metric, diagnosis_change, folder_name
from bpexp.progress import Progress
from bpexp.store import Sweep

DPI = 120
QUANTITIES = [  # what the report reads of the dynamics: the per-layer norms and the logged profiles
    "grad_norm",
    "delta_norm",
    "update_ratio",
    "val/loss",
    "diverged/step",
    Metric.delta_ratio,
    Metric.delta_slope,
    Metric.grad_ratio,
    Metric.grad_slope,
    Metric.sharpness_top,  # the edge-of-stability study
]
GRAD = r"$\Vert\partial L/\partial W^{(l)}\Vert_F$"
DELTA = r"$\Vert\delta^{(l)}\Vert_F = \Vert\partial L/\partial z^{(l)}\Vert_F$"
DELTA_RATIO = r"$\log_{10}(\Vert\delta^{(1)}\Vert / \Vert\delta^{(L)}\Vert)$"
UPDATE = r"$\Vert\Delta W^{(l)}\Vert / \Vert W^{(l)}\Vert$ per step"
FIGURES = ["init_profile", "grad_heatmap", "loss_vs_depth", "update_ratio", "theory"]
DIAGNOSIS_ORDER = ["exploding", "vanishing", "dead_units", "saturated", "diverged", "healthy"]


@dataclass
class Report:
    """What build_report wrote, and the tables it wrote them from."""

    sweep: Sweep
    directory: Path
    markdown: Path
    runs: pd.DataFrame  # load_runs
    summary: pd.DataFrame  # analysis.summarize
    configs: pd.DataFrame  # analysis.rank_configs
    shown: list[str]  # run ids drawn in the per-run figures
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)
    logged_to: str | None = None  # the parent run that holds the report as artifacts under report/
    studies: list[studies.Section] = field(default_factory=list)  # sections of a designed study


def build_report(
    sweep: str = "latest",
    experiment: str = "bpexp",
    tracking_uri: str | None = None,
    out_dir: Path | str = "reports",
    show: Sequence[str] | None = None,
    max_shown: int = 4,
    log: bool = True,
    progress: bool = False,
) -> Report:
    """Write reports/<sweep>/ (report.md, the figures, configs.csv, runs.csv) and log it to the parent.

    `sweep`: a sweep id, a parent run id or 'latest'. `show`: run ids (or run names) for the per-run
    figures (heatmap, update ratios); default: up to `max_shown` runs chosen by ``choose_runs``.
    """
    found = store.find_sweep(sweep, experiment, tracking_uri)
    runs = found.runs()
    if runs.empty:
        raise LookupError(f"sweep {found.sweep_id!r} has no runs (parent run {found.parent_run_id})")
    dynamics = store.load_dynamics(runs, quantities=QUANTITIES, progress=progress)
    summary = analysis.summarize(runs, dynamics)
    by = analysis.config_columns(summary)
    summary["config"] = analysis.config_label(summary, by).to_numpy()
    configs = analysis.rank_configs(summary, by)
    shown = pick_shown(summary, show) if show else choose_runs(summary, max_shown)

    directory = Path(out_dir) / folder_name(found.sweep_id)
    directory.mkdir(parents=True, exist_ok=True)
    report = Report(found, directory, directory / "report.md", runs, summary, configs, shown)
    drawings = {  # drawn one at a time, behind the progress bar
        "init_profile": lambda: init_profile_figure(summary, dynamics),
        "grad_heatmap": lambda: heatmap_figure(summary, dynamics, shown),
        "loss_vs_depth": lambda: loss_depth_figure(summary, by),
        "update_ratio": lambda: update_ratio_figure(summary, dynamics, shown),
        "theory": lambda: theory_figure(summary),
    }
    bar = Progress(len(drawings), "figures", stream=None if progress else io.StringIO(), unit="figure")
    for done, (name, draw) in enumerate(drawings.items(), start=1):
        fig = draw()
        bar.update(done)
        path = directory / f"{name}.png"
        path.unlink(missing_ok=True)  # no stale figure from an earlier report of this sweep
        if fig is not None:
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            report.figures[name] = path
    bar.close()
    report.studies = studies.sections(summary, dynamics)  # a designed study's answers: effects, trainability
    for section in report.studies:
        for name, fig in section.figures.items():
            fig.savefig(directory / f"{name}.png", dpi=DPI)
            plt.close(fig)
            report.figures[name] = directory / f"{name}.png"
    report.tables["configs"] = directory / "configs.csv"
    configs.to_csv(report.tables["configs"], index=False)
    report.tables["runs"] = directory / "runs.csv"
    runs_table(summary).to_csv(report.tables["runs"], index=False)
    report.markdown.write_text(markdown(report, dynamics.attrs.get("sources", {})))
    if log and found.parent_run_id:
        client = store.make_client(found.tracking_uri)
        for path in [report.markdown, *report.figures.values(), *report.tables.values()]:
            client.log_artifact(found.parent_run_id, str(path), "report")
        report.logged_to = found.parent_run_id
    return report


# --------------------------------------------------------------------------------------------------
# Which runs to draw one by one


def choose_runs(summary: pd.DataFrame, n: int = 4) -> list[str]:
    """Up to n runs, one per config, that show the range of the sweep: per diagnosis (exploding,
    vanishing, dead_units, saturated, diverged, then healthy) the run whose δ ratio at initialization
    is the most extreme, then the most extreme of the rest."""
    rows = (
        summary[summary["grad_log10_ratio_init"].notna()] if "grad_log10_ratio_init" in summary else summary
    )
    rows = rows.assign(_extreme=rows.get("delta_log10_ratio_init", pd.Series(0.0, index=rows.index)).abs())
    rows = rows.sort_values("_extreme", ascending=False, na_position="last", kind="stable")
    chosen: list[str] = []
    configs: set[Any] = set()

    def take(candidates: pd.DataFrame) -> None:
        for _, row in candidates.iterrows():
            if len(chosen) < n and row["config"] not in configs:
                chosen.append(row["run_id"])
                configs.add(row["config"])
                return

    diagnosis = rows["diagnosis"] if "diagnosis" in rows else pd.Series("", index=rows.index)
    for name in DIAGNOSIS_ORDER:
        take(rows[diagnosis == name])
    for _, row in rows.iterrows():
        take(rows.loc[[row.name]])
    return chosen


def pick_shown(summary: pd.DataFrame, wanted: Sequence[str]) -> list[str]:
    """Run ids for --show, given as run ids, unique prefixes of them, or run names."""
    ids = []
    for item in wanted:
        hit = summary[(summary["run_id"].str.startswith(item)) | (summary["run_name"] == item)]
        if hit.empty:
            raise LookupError(f"--show {item!r} is not a run of this sweep (give a run id or run name)")
        ids.append(str(hit["run_id"].iloc[0]))
    return ids


# --------------------------------------------------------------------------------------------------
# Figures


def init_profile_figure(summary: pd.DataFrame, dynamics: pd.DataFrame) -> plt.Figure | None:
    """‖∂L/∂W^(l)‖ and ‖δ^(l)‖ at initialization against l, one line per config (geometric mean over
    seeds, band = lowest to highest seed)."""
    at = summary[["run_id", "config", "init_step"]].dropna()
    if at.empty:
        return None
    keys = pd.MultiIndex.from_arrays([at["run_id"].astype(str), at["init_step"].astype("int64")])
    rows = dynamics[dynamics["layer"].notna()]
    rows = rows[pd.MultiIndex.from_arrays([rows["run_id"].astype(str), rows["step"]]).isin(keys)]
    rows = rows.assign(
        config=rows["run_id"].astype(str).map(dict(zip(at["run_id"], at["config"], strict=True)))
    )
    order = {c: i for i, c in enumerate(summary["config"].drop_duplicates())}
    rows = rows.sort_values("config", key=lambda s: s.map(order), kind="stable")
    n_configs = rows["config"].nunique()
    columns = 1 if n_configs <= 6 or max(map(len, order)) > 60 else 2
    height = 4.6 + 0.22 * math.ceil(n_configs / columns)
    fig, axes = plt.subplots(1, 2, figsize=(13, height), constrained_layout=True)
    for ax, quantity, name in ((axes[0], "grad_norm", GRAD), (axes[1], "delta_norm", DELTA)):
        config_profiles(rows[rows["quantity"] == quantity], ax=ax, ylabel=name, legend=False)
        ax.set_title(f"{name} at initialization")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize="small", ncols=columns)
    fig.suptitle(
        "Per-layer gradient profile at initialization (line: geometric mean over seeds; band: range)"
    )
    return fig


def heatmap_figure(summary: pd.DataFrame, dynamics: pd.DataFrame, run_ids: list[str]) -> plt.Figure | None:
    """log10 ‖∂L/∂W^(l)‖ over layers × steps for the chosen runs, each on its own colour scale (one
    diverged run spans tens of decades and would flatten every other panel on a shared one)."""
    rows = dynamics[dynamics["run_id"].isin(run_ids) & (dynamics["quantity"] == "grad_norm")]
    runs = [r for r in run_ids if (rows["run_id"] == r).any()]
    if not runs:
        return None
    fig, axes = grid(len(runs), width=6.2, height=3.8)
    names = summary.set_index("run_id")
    seeds = "seed" in summary and summary["seed"].nunique() > 1
    for ax, run_id in zip(axes, runs, strict=False):
        layer_step_heatmap(rows[rows["run_id"] == run_id], "grad_norm", ax=ax, label=f"log10 {GRAD}")
        ax.set_title(run_title(names.loc[run_id], seeds), fontsize="medium")
    fig.suptitle(f"log10 {GRAD} by layer and probe step (colour scale per run; blank: not finite)")
    return fig


def loss_depth_figure(summary: pd.DataFrame, by: list[str]) -> plt.Figure | None:
    """Final validation loss of each swept config, mean over seeds with its 95% bootstrap CI, next to
    the share of runs that diverged: against depth when the sweep varies depth (one line per other
    config), else as bars per config with every run a dot (the spread over seeds)."""
    if "model.depth" not in summary or summary["model.depth"].isna().all():
        return None
    columns = analysis.label_columns(summary, by)  # the swept values only: optim, not its lr
    if "model.depth" in columns:
        return depth_lines_figure(summary, columns)
    return config_bars_figure(summary, columns)


def depth_lines_figure(summary: pd.DataFrame, columns: list[str]) -> plt.Figure:
    x = "model.depth"
    hue_columns = [c for c in columns if c != x]
    table = analysis.aggregate(summary, [x, *hue_columns], ["final_val_loss"])
    table["hue"] = label_values(table, hue_columns)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[3, 2], constrained_layout=True)
    lines_with_bands(table, x, "final_val_loss", hue="hue", ax=left, ylabel="final validation loss")
    left.set_title("final validation loss: mean over seeds, 95% bootstrap CI\n(runs that diverged left out)")
    left.set_xlabel("depth (hidden layers)")
    for i, (name, rows) in enumerate(table.groupby("hue", sort=False)):
        rows = rows.sort_values(x)
        right.plot(
            rows[x], 100 * rows["share_diverged"], marker="o", ms=4, color=plt.cm.tab10(i % 10), label=name
        )
    right.set_ylim(-5, 105)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("depth (hidden layers)")
    right.set_ylabel("runs diverged (%)")
    right.set_title("share of runs that diverged")
    right.grid(True, alpha=0.3)
    if left.get_legend():
        left.get_legend().set_title(legend_title(hue_columns))
    return fig


def config_bars_figure(summary: pd.DataFrame, columns: list[str]) -> plt.Figure:
    """Depth is fixed: one bar per config. With two or more swept axes that form a full grid, the first
    is the x axis and the others the colour (init × optimizer: four groups of two bars)."""
    table = analysis.aggregate(summary, columns, ["final_val_loss"])
    x_columns, hue_columns = columns[:1], columns[1:]
    n_x = table[x_columns].drop_duplicates().shape[0] if x_columns else 1
    if not hue_columns or n_x * table[hue_columns].drop_duplicates().shape[0] != len(table):
        x_columns, hue_columns = columns, []  # not a grid: one bar per config, the whole label below it
    runs = summary.assign(x=label_values(summary, x_columns), hue=label_values(summary, hue_columns))
    table = table.assign(x=label_values(table, x_columns), hue=label_values(table, hue_columns))
    hue = "hue" if hue_columns else None
    depth = ", ".join(analysis.format_value(d) for d in summary["model.depth"].dropna().unique())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[3, 2], constrained_layout=True)
    bars_with_ci(table, "x", "final_val_loss", hue=hue, runs=runs, ax=left, ylabel="final validation loss")
    left.set_title(
        f"final validation loss at depth {depth}: mean over seeds, 95% bootstrap CI, dots: runs\n"
        "(runs that diverged left out)"
    )
    shares = table.assign(share_mean=100 * table["share_diverged"], share_lo=np.nan, share_hi=np.nan)
    bars_with_ci(shares, "x", "share", hue=hue, ax=right, log=False, ylabel="runs diverged (%)")
    right.set_ylim(0, 105)
    right.set_title("share of runs that diverged")
    if not table["share_diverged"].any():
        right.text(0.5, 0.5, "no run diverged", transform=right.transAxes, ha="center", color="dimgray")
    if right.get_legend():
        right.get_legend().remove()  # the same colours as on the left
    if left.get_legend():
        left.get_legend().set_title(legend_title(hue_columns))
    for ax in (left, right):
        ax.set_xlabel(legend_title(x_columns) or "config")
    if len(x_columns) > 1:  # whole labels: too long to repeat on the narrow panel
        right.tick_params(labelbottom=False)
        right.set_xlabel("config, in the order on the left")
    return fig


def label_values(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Per row, the values of `columns` as text: 'tanh' for one column (the axis or legend title names
    it), 'activation=tanh init=he' for more; 'all runs' for none."""
    if len(columns) == 1:
        return table[columns[0]].map(analysis.format_value).to_numpy()
    return analysis.config_label(table, columns).to_numpy()


def legend_title(columns: list[str]) -> str | None:
    """The column a legend's or an axis's bare values belong to; None when the labels name their own."""
    return analysis.short_name(columns[0]) if len(columns) == 1 else None


def update_ratio_figure(
    summary: pd.DataFrame, dynamics: pd.DataFrame, run_ids: list[str]
) -> plt.Figure | None:
    """‖ΔW^(l)‖/‖W^(l)‖ per step against step for the chosen runs, one line per layer."""
    runs = [
        r for r in run_ids if ((dynamics["run_id"] == r) & (dynamics["quantity"] == "update_ratio")).any()
    ]
    if not runs:
        return None
    fig, axes = grid(len(runs), width=6.2, height=3.8)
    names = summary.set_index("run_id")
    seeds = "seed" in summary and summary["seed"].nunique() > 1
    for ax, run_id in zip(axes, runs, strict=False):
        rows = dynamics[(dynamics["run_id"] == run_id) & (dynamics["quantity"] == "update_ratio")]
        layer_lines(rows, "update_ratio", ax=ax, ylabel=UPDATE)
        ax.set_title(run_title(names.loc[run_id], seeds), fontsize="medium")
    fig.suptitle(
        "Update-to-weight ratio per layer over training (~1e-3 is the usual rule of thumb; gaps: exactly 0)"
    )
    return fig


def theory_figure(summary: pd.DataFrame) -> plt.Figure | None:
    """Measured log10(‖δ^(1)‖/‖δ^(L)‖) at initialization against the mean-field prediction, per run."""
    predicted = "theory/delta_log10_ratio"
    if predicted not in summary or summary[predicted].notna().sum() == 0:
        return None
    hue = "model.activation" if "model.activation" in summary else None
    fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    measured_vs_predicted(summary, predicted, "delta_log10_ratio_init", hue=hue, ax=ax)
    ax.set_xlabel(f"predicted {DELTA_RATIO} (mean field)")
    ax.set_ylabel(f"measured {DELTA_RATIO} at initialization")
    ax.set_title("Error signal at initialization: measured vs theory\n(band: ±0.5 decades)")
    return fig


def grid(n: int, width: float, height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), constrained_layout=True, squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def run_title(run: pd.Series, seeds: bool = False) -> str:
    """The run's swept values (its config label; the seed too when the sweep has several), then how it
    ended. Whole run names repeat the fixed overrides and run into the next panel's title."""
    config = run.get("config") or run.get("run_name") or str(run.name)[:8]
    seed = f" seed={run['seed']}" if seeds and "seed" in run else ""
    state = diagnosis_change(run.get("diagnosis_init"), run.get("diagnosis")) or "?"
    return f"{config}{seed}\n{run.get('outcome', '?')}, {state}"


# --------------------------------------------------------------------------------------------------
# Markdown


RUN_TABLE = [
    "run_name",
    "run_id",
    "config",
    "seed",
    "outcome",
    "diagnosis_init",
    "diagnosis",
    "diverged_step",
    "delta_log10_ratio_init",
    "grad_log10_ratio_init",
    "final_val_loss",
    "best_val_loss",
]


def runs_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per run, in load_runs order: what runs.csv and the report's run table show."""
    return summary[[c for c in RUN_TABLE if c in summary]].reset_index(drop=True)


def markdown(report: Report, sources: dict[str, int]) -> str:
    sweep, summary = report.sweep, report.summary
    outcomes = summary["outcome"].fillna("unknown").value_counts() if "outcome" in summary else pd.Series()
    by = analysis.config_columns(summary)
    lines = [
        f"# Sweep `{sweep.sweep_id}`",
        "",
        f"- store: `{sweep.tracking_uri}`, experiment `{sweep.experiment}`",
        f"- parent run: `{sweep.parent_run_id or 'none'}`",
        f"- {count(len(summary), 'run')} in {count(len(report.configs), 'config')}"
        + (f" (axes: {', '.join(f'`{c}`' for c in by)})" if by else ""),
        "- outcomes: " + ", ".join(f"{name} {n}" for name, n in outcomes.items()),
        f"- dynamics from Parquet artifacts for {sources.get('parquet', 0)} runs, from the MLflow metric "
        f"history for {sources.get('history', 0)}",
        f"- written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m bpexp.report`",
        "",
        "## Configs ranked by outcome",
        "",
        "Fewest diverged runs first, then lowest median final validation loss. δ ratio = "
        "log10(‖δ^(1)‖/‖δ^(L)‖) at initialization (< −2: the error signal vanishes by > 100× toward "
        "the input; > 2: it explodes). Final loss: over runs that completed. Both: mean over seeds "
        "[95% bootstrap CI].",
        "",
        markdown_table(configs_for_markdown(report.configs)),
        "",
    ]
    for section in report.studies:  # the study's answer comes before the per-run evidence
        lines += [f"## {section.title}", "", *section.lines, ""]
        lines += [f"![{name}]({name}.png)" for name in section.figures] + [""]
    sections = {
        "init_profile": (
            "Gradient profile at initialization",
            "One line per config (geometric mean over seeds; band: lowest to highest seed). A line that "
            "falls toward layer 1 is a vanishing signal; ‖∂L/∂W‖ can stay flat while δ vanishes, because "
            "the forward activations shrink at the same rate (see docs/design.md in the bpexp project).",
        ),
        "grad_heatmap": (
            "Weight gradients over training",
            "log10 ‖∂L/∂W^(l)‖ per layer and probe step for the runs shown (one per config, chosen to "
            "cover the diagnoses; `--show` picks others), each on its own colour scale.",
        ),
        "loss_vs_depth": (
            "Final loss",
            "Against depth when the sweep varies depth, else one bar per config (dots: its runs). Mean "
            "over seeds with its 95% bootstrap confidence interval (none for a single seed); diverged runs "
            "are left out of the loss and counted on the right.",
        ),
        "update_ratio": (
            "Update-to-weight ratio per layer",
            "‖ΔW^(l)‖/‖W^(l)‖ of each optimizer step, one line per layer (colour = layer).",
        ),
        "theory": (
            "Measured against mean-field theory",
            "Each point is a run: δ ratio at initialization against the prediction of bpexp.theory.",
        ),
    }
    for name, (title, text) in sections.items():
        if name in report.figures:
            lines += [f"## {title}", "", text, "", f"![{title}]({report.figures[name].name})", ""]
    missing = [sections[n][0] for n in FIGURES if n not in report.figures]
    if missing:
        lines += [f"Not drawn (no data in these runs): {', '.join(missing)}.", ""]
    lines += [
        "## Runs",
        "",
        markdown_table(runs_for_markdown(runs_table(summary))),
        "",
        "## In pandas",
        "",
        "```python",
        "from bpexp import analysis, store",
        f"runs = store.load_runs({sweep.experiment!r}, sweep={sweep.sweep_id!r}, "
        f"tracking_uri={sweep.tracking_uri!r})",
        "summary = analysis.summarize(runs, store.load_dynamics(runs))",
        'analysis.pivot(summary, "model.depth", "model.activation", "final_val_loss")',
        "```",
        "",
    ]
    return "\n".join(lines)


def configs_for_markdown(configs: pd.DataFrame) -> pd.DataFrame:
    def with_ci(value: str, spec: str = ".4g") -> list[str]:
        """`mean [lo, hi]`: the mean over seeds and its 95% bootstrap CI (just the value for one seed)."""
        columns = (configs[f"{value}_{part}"] for part in ("mean", "lo", "hi"))
        return [
            f"{fmt(m, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]" if not math.isnan(lo) else fmt(m, spec)
            for m, lo, hi in zip(*columns, strict=True)
        ]

    out = pd.DataFrame(
        {
            "rank": configs["rank"],
            "config": configs["config"],
            "runs": configs["n_runs"],
            "completed": configs["completed"],
            "diverged": configs["diverged"],
            "diagnosis": configs["diagnosis"],
            "δ ratio at init": with_ci("delta_log10_ratio_init", "+.2f"),
            "final val loss": with_ci("final_val_loss"),
            "best val loss (median)": configs["best_val_loss_median"].map(fmt),
        }
    )
    return out


def runs_for_markdown(runs: pd.DataFrame) -> pd.DataFrame:
    out = runs.copy()
    if "diagnosis" in out:  # both states in one column: vanishing → healthy
        out["diagnosis"] = analysis.diagnosis_states(out).to_numpy()
        out = out.drop(columns="diagnosis_init", errors="ignore")
    out["run_id"] = out["run_id"].str[:8]
    for name in ("delta_log10_ratio_init", "grad_log10_ratio_init"):
        if name in out:
            out[name] = out[name].map(lambda v: fmt(v, "+.2f"))
    for name in ("final_val_loss", "best_val_loss"):
        if name in out:
            out[name] = out[name].map(fmt)
    return out


def fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) if isinstance(value, (int, float, np.number)) else str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency); numbers right-aligned."""
    header = [str(c) for c in frame.columns]
    align = ["---:" if frame[c].dtype.kind in "iuf" else "---" for c in frame.columns]
    body = [[fmt(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    rows = [header, align, *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bpexp.report",
        description="Write a sweep's report and log it to the sweep's parent run.",
    )
    parser.add_argument("sweep", nargs="?", default="latest", help="sweep id, parent run id, or 'latest'")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"
    )
    parser.add_argument("--experiment", default="bpexp")
    parser.add_argument("--out-dir", default="reports", help="the report goes to <out-dir>/<sweep>/")
    parser.add_argument("--show", nargs="+", default=None, help="run ids or names for the per-run figures")
    parser.add_argument("--max-shown", type=int, default=4, help="runs chosen for the per-run figures")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)
    try:
        report = build_report(
            args.sweep,
            args.experiment,
            args.tracking_uri,
            args.out_dir,
            args.show,
            args.max_shown,
            not args.no_log,
            progress=True,
        )
    except LookupError as err:
        print(f"bpexp.report: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    runs, configs = count(len(report.runs), "run"), count(len(report.configs), "config")
    print(f"report of sweep {report.sweep.sweep_id}: {runs}, {configs}")
    print(f"  {report.markdown}")
    for path in [*report.figures.values(), *report.tables.values()]:
        print(f"  {path}")
    if report.logged_to:
        print(f"  logged to the parent run {report.logged_to} under report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
