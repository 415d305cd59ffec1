"""Statistics of runs: per-run summaries, aggregates over seeds, rankings. Pure: DataFrames in and out.

Its inputs are the tables of bpexp/store.py (``load_runs``, ``load_dynamics``) or hand-made ones of
the same shape; it reads no store and imports no training code (docs/design.md). Two kinds of function:

- per-run numbers: ``summarize`` (δ and ∂L/∂W profiles at init and at the end, losses, divergence);
- across runs: ``bootstrap_ci``, ``aggregate`` (mean and 95% CI over seeds), ``pivot``, ``rank_configs``.

The numbers ``summarize`` derives are snake_case columns (``delta_log10_ratio_init``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bpexp.names import RUN_COLUMNS, diagnosis_change, is_experiment
from bpexp.names import counts_text as counts_of

# --------------------------------------------------------------------------------------------------
# Which columns are the experiment


def param_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that came from params: attrs['params'] when load_runs set it, else by name (dotted
    config keys, and the top-level `seed` and `device`)."""
    known = frame.attrs.get("params")
    if known is not None:
        return [c for c in frame.columns if c in set(known)]
    derived = set(RUN_COLUMNS) | set(SUMMARY_COLUMNS)
    return [
        c
        for c in frame.columns
        if c not in derived and "/" not in c and ("." in c or c in ("seed", "device"))
    ]


def config_columns(frame: pd.DataFrame) -> list[str]:
    """Params that vary across the runs and describe the network or its training (not the seed,
    tracking, device or theory.*): the axes of a sweep, e.g. ['model.activation', 'model.depth']."""
    columns = []
    for name in param_columns(frame):
        if not is_experiment(name) or name == "seed" or name.startswith("theory."):
            continue  # where and how a run was recorded, its seed, the theory's predictions
        if frame[name].nunique(dropna=False) > 1:
            columns.append(name)
    return columns


def config_label(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.Series:
    """'depth=8 activation=tanh optim=adam' per row, from the label_columns of `columns` (default:
    config_columns): the last part of each dotted key (the group for `<group>.name`), unless two clash."""
    columns = label_columns(frame, config_columns(frame) if columns is None else columns)
    if not columns:
        return pd.Series("all runs", index=frame.index, dtype=object)
    short = [short_name(c) for c in columns]
    names = short if len(set(short)) == len(short) else columns
    parts = [
        frame[c].map(lambda v, n=n: f"{n}={format_value(v)}") for c, n in zip(columns, names, strict=True)
    ]
    label = parts[0].astype(object)
    for part in parts[1:]:
        label = label + " " + part.astype(object)
    return label


def short_name(column: str) -> str:
    """'model.depth' -> 'depth'; 'optim.name' -> 'optim' (the option chosen for the group)."""
    group, _, key = column.rpartition(".")
    return group.rsplit(".", 1)[-1] if key == "name" and group else key


def label_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns a label needs: `columns` less those that another one fixes. Sweeping `optim=momentum,adam`
    varies optim.name, optim.lr and optim.momentum together; each optimizer's lr follows from its name,
    so the label says `optim=adam`, not `name=adam lr=0.001`. Group choices (`*.name`) are kept first. A
    column whose every value is its own config (a search over η) fixes nothing and stays alone."""
    configs = frame[list(columns)].drop_duplicates()
    kept: list[str] = []
    for column in sorted(columns, key=lambda c: not c.endswith(".name")):  # stable sort
        fixed_by = [
            k
            for k in kept
            if configs[k].nunique(dropna=False) < len(configs)
            and (configs.groupby(k, dropna=False)[column].nunique(dropna=False) <= 1).all()
        ]
        if not fixed_by:
            kept.append(column)
    return [c for c in columns if c in kept]


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Per-run summaries


def logged_profiles(dynamics: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Per (run_id, step) where the run logged a finite `<prefix>/log10_ratio` and `<prefix>/slope`
    (the probes' own numbers, Metric.delta_ratio …): run_id, step, log10_ratio, slope, sorted."""
    keys = {f"{prefix}/log10_ratio": "log10_ratio", f"{prefix}/slope": "slope"}
    rows = dynamics.loc[dynamics["quantity"].isin(list(keys)), ["run_id", "step", "quantity", "value"]]
    wide = rows.assign(run_id=rows["run_id"].astype(object), quantity=rows["quantity"].astype(object))
    wide = wide.pivot_table(index=["run_id", "step"], columns="quantity", values="value", aggfunc="last")
    wide = wide.reindex(columns=list(keys)).rename(columns=keys)
    finite = np.isfinite(wide.to_numpy(dtype=float)).all(axis=1)
    return wide[finite].reset_index().sort_values(["run_id", "step"], kind="stable")


SUMMARY_COLUMNS = [
    "init_step",
    "end_step",
    "delta_log10_ratio_init",
    "delta_log10_ratio_end",
    "delta_slope_init",
    "delta_slope_end",
    "delta_gain_init",
    "delta_gain_end",
    "grad_log10_ratio_init",
    "grad_log10_ratio_end",
    "grad_slope_init",
    "grad_slope_end",
    "grad_gain_init",
    "grad_gain_end",
    "diverged",
    "final_val_loss",
    "best_val_loss",
    "best_val_step",
]


def summarize(runs: pd.DataFrame, dynamics: pd.DataFrame) -> pd.DataFrame:
    """The runs table plus, per run, the numbers a sweep is compared on (SUMMARY_COLUMNS):

    - `delta_*` and `grad_*`: log10(‖·^(1)‖/‖·^(L)‖), the slope of log10‖·^(l)‖ against l (decades per
      layer) and the per-layer gain 10**slope, for δ^(l) and ∂L/∂W^(l), as the probes logged them
      (`delta/log10_ratio`, `delta/slope`, `grad/…`) at the first probe step where they are finite
      (`_init`, normally step 0) and at the last one (`_end`); `init_step` and `end_step` say which
      steps (those of ∂L/∂W);
    - `diverged` (outcome == 'diverged') and `diverged_step` (the tag, else the diverged/step metric);
    - `final_val_loss` (the last val/loss of a completed run, from the dynamics, else the run's final
      metric; NaN for a diverged or failed one, so a median of final losses is over runs that
      finished), `best_val_loss` and `best_val_step` (the lowest finite val/loss in the dynamics).
    """
    out = runs.copy()
    index = pd.Index(out["run_id"].astype(str))
    for name in ("delta", "grad"):  # the ratios and slopes every probe logged: read, not recomputed
        found = logged_profiles(dynamics, name)
        for when, pick in (("init", "first"), ("end", "last")):
            at = found.groupby("run_id").agg(pick).reindex(index)
            out[f"{name}_log10_ratio_{when}"] = at["log10_ratio"].to_numpy(dtype=float)
            out[f"{name}_slope_{when}"] = at["slope"].to_numpy(dtype=float)
            out[f"{name}_gain_{when}"] = 10.0 ** out[f"{name}_slope_{when}"]
            out[f"{when}_step"] = pd.array(at["step"].to_numpy(dtype=float), dtype="Int64")
    outcome = out["outcome"] if "outcome" in out else pd.Series(None, index=out.index, dtype=object)
    out["diverged"] = (outcome == "diverged").to_numpy(dtype=bool)
    tagged = out["diverged_step"] if "diverged_step" in out else pd.Series(pd.NA, index=out.index)
    logged = pd.array(first_value(dynamics, "diverged/step").reindex(index).to_numpy(), dtype="Int64")
    out["diverged_step"] = pd.array(tagged, dtype="Int64").fillna(pd.Series(logged, index=out.index))

    val = dynamics.loc[dynamics["quantity"] == "val/loss", ["run_id", "step", "value"]]
    val = val.assign(run_id=val["run_id"].astype(object)).sort_values(["run_id", "step"], kind="stable")
    last = val.groupby("run_id")["value"].last().reindex(index).to_numpy(dtype=float)
    if "val/loss" in out:  # no val/loss in the dynamics (filtered out): the run's final metric
        last = np.where(np.isnan(last), out["val/loss"].to_numpy(dtype=float), last)
    out["final_val_loss"] = np.where((outcome == "completed").to_numpy(dtype=bool), last, np.nan)
    finite = val[np.isfinite(val["value"])]
    best = finite.loc[finite.groupby("run_id")["value"].idxmin()].set_index("run_id").reindex(index)
    out["best_val_loss"] = best["value"].to_numpy(dtype=float)
    out["best_val_step"] = pd.array(best["step"].to_numpy(dtype=float), dtype="Int64")
    out.attrs.update(runs.attrs)
    return out


def first_value(dynamics: pd.DataFrame, quantity: str) -> pd.Series:
    """The first value of a network-level quantity per run, indexed by run_id."""
    rows = dynamics.loc[dynamics["quantity"] == quantity, ["run_id", "step", "value"]]
    rows = rows.assign(run_id=rows["run_id"].astype(object)).sort_values("step", kind="stable")
    return rows.groupby("run_id")["value"].first()


# --------------------------------------------------------------------------------------------------
# Across runs


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, ci: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (NaN dropped): resample the values with
    replacement n_boot times, take the (1-ci)/2 and (1+ci)/2 quantiles of the resampled means.
    (nan, nan) for fewer than two values: one seed gives no interval."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def aggregate(
    summary: pd.DataFrame,
    by: Sequence[str] | str | None = None,
    values: Sequence[str] | str = ("final_val_loss", "best_val_loss", "delta_log10_ratio_init"),
    *,
    ci: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per config (the `by` columns; default: config_columns, i.e. everything but the seed):
    n_runs, share_diverged, and for each of `values` its n (non-NaN runs), mean, median and the
    bootstrap CI of the mean: `<value>_n`, `_mean`, `_median`, `_lo`, `_hi`."""
    by = [by] if isinstance(by, str) else list(config_columns(summary) if by is None else by)
    values = [values] if isinstance(values, str) else list(values)
    keyed = summary.assign(_all="all runs") if not by else summary
    keys = by or ["_all"]
    rows = []
    for key, group in keyed.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n_runs"] = len(group)
        row["share_diverged"] = float(group["diverged"].mean()) if "diverged" in group else math.nan
        for value in values:
            x = group[value].to_numpy(dtype=np.float64)
            x = x[~np.isnan(x)]
            lo, hi = bootstrap_ci(x, ci, n_boot, seed)
            row[f"{value}_n"] = len(x)
            row[f"{value}_mean"] = float(x.mean()) if len(x) else math.nan
            row[f"{value}_median"] = float(np.median(x)) if len(x) else math.nan
            row[f"{value}_lo"], row[f"{value}_hi"] = lo, hi
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.drop(columns="_all") if not by else table


def pivot(
    frame: pd.DataFrame,
    index: Sequence[str] | str,
    columns: Sequence[str] | str = (),
    values: str = "final_val_loss",
    aggfunc: str | Callable[[pd.Series], Any] = "median",
) -> pd.DataFrame:
    """values aggregated over runs, `index` down and `columns` across, e.g. depth × (activation, init)
    -> median final loss; `values='diverged', aggfunc='mean'` gives the share diverged. Missing
    param values (null) stay as group keys; a cell with no run is NaN."""
    index = [index] if isinstance(index, str) else list(index)
    columns = [columns] if isinstance(columns, str) else list(columns)
    series = frame[values]
    if series.dtype == bool or str(series.dtype) == "boolean":
        series = series.astype("float64")
    table = series.groupby([frame[k] for k in [*index, *columns]], dropna=False, sort=True).agg(aggfunc)
    if columns:
        table = table.unstack([len(index) + i for i in range(len(columns))])
    return table.to_frame() if isinstance(table, pd.Series) else table


RANK_VALUES = ["final_val_loss", "best_val_loss", "delta_log10_ratio_init"]


def rank_configs(
    summary: pd.DataFrame, by: Sequence[str] | None = None, *, ci: float = 0.95, n_boot: int = 10_000
) -> pd.DataFrame:
    """The configs ranked by outcome: fewest diverged first, then lowest median final val loss.

    Columns: rank, config (a label), the `by` columns (default: config_columns), n_runs, completed and
    diverged (counts), diagnosis ('vanishing → healthy ×2, healthy ×1': at init → at the end, most
    common first), the median, mean and CI of delta_log10_ratio_init and of final_val_loss, the
    median best_val_loss.
    """
    by = list(config_columns(summary) if by is None else by)
    table = aggregate(summary, by, RANK_VALUES, ci=ci, n_boot=n_boot)
    keyed = summary.assign(config=config_label(summary, by), _all="all runs")
    if "outcome" not in keyed:
        keyed["outcome"] = "unknown"
    keyed["states"] = diagnosis_states(keyed)
    extra = [  # the same groupby as aggregate's, so the rows line up
        {
            "config": group["config"].iloc[0],
            "completed": int((group["outcome"] == "completed").sum()),
            "diverged": int((group["outcome"] == "diverged").sum()),
            "diagnosis": counts_text(group["states"]),
        }
        for _, group in keyed.groupby(by or ["_all"], dropna=False, sort=True)
    ]
    table = pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)
    table = table.sort_values(
        ["share_diverged", "final_val_loss_median", "best_val_loss_median"], na_position="last", kind="stable"
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    columns = [
        "rank",
        "config",
        *by,
        "n_runs",
        "completed",
        "diverged",
        "diagnosis",
        "delta_log10_ratio_init_median",
        "delta_log10_ratio_init_mean",
        "delta_log10_ratio_init_lo",
        "delta_log10_ratio_init_hi",
        "final_val_loss_median",
        "final_val_loss_mean",
        "final_val_loss_lo",
        "final_val_loss_hi",
        "best_val_loss_median",
    ]
    return table[columns]


def diagnosis_states(frame: pd.DataFrame) -> pd.Series:
    """Per run 'vanishing → healthy' (at initialization → at the end, one word when they agree), from
    the diagnosis_init and diagnosis columns; 'unknown' where neither was tagged."""

    def word(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    init = frame["diagnosis_init"] if "diagnosis_init" in frame else pd.Series(None, index=frame.index)
    end = frame["diagnosis"] if "diagnosis" in frame else pd.Series(None, index=frame.index)
    states = [
        diagnosis_change(word(i), word(e)) if word(i) or word(e) else "unknown"
        for i, e in zip(init, end, strict=True)
    ]
    return pd.Series(states, index=frame.index, dtype=object)


def counts_text(values: pd.Series) -> str:
    return counts_of(values.fillna("unknown").astype(str))
