"""Effects of two-level factors on a per-run number, with bootstrap confidence intervals across seeds.

A factorial study (every practice on or off, several seeds per cell) answers "how much does each
practice help, and which pairs only work together" with effects, not rankings. Pure functions on a
table with one row per run (e.g. `analysis.summarize`'s): no store, no torch.

Conventions (those of the design-of-experiments literature, e.g. Box, Hunter & Hunter, ch. 5):
- a *cell* is one combination of factor levels; its value is the mean over its runs (seeds), so a cell
  with more seeds does not weigh more, and a fractional design (not every cell run) still works;
- the **main effect** of factor A is the mean of the cells at A's high level minus the mean of the
  cells at its low level: the change A makes, averaged over the levels of the other factors;
- the **interaction** A×B is the effect of A with B high minus the effect of A with B low (each
  averaged over the other factors): how much more the two change the value together than their
  separate effects add up to; 0 when A helps equally whatever B is. It is twice the textbook ±1
  contrast (cells where A and B agree minus cells where they differ), which is what is computed.
- Confidence intervals resample the runs of each cell with replacement (a stratified bootstrap over
  seeds) and recompute every effect from the resampled cell means: the percentile interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

EFFECT_COLUMNS = ["term", "factors", "effect", "lo", "hi", "low_mean", "high_mean", "n_cells", "n_runs"]


def coded(frame: pd.DataFrame, levels: Mapping[str, tuple[Any, Any]]) -> pd.DataFrame:
    """Each factor column as +1 (its high level) or −1 (its low level); rows at any other level fail.

    `levels` maps a column to its (low, high) pair, e.g. {"model.norm": ("none", "batchnorm")}.
    """
    out = {}
    for name, (low, high) in levels.items():
        column = frame[name].astype(object)
        is_low, is_high = column.eq(low).to_numpy(), column.eq(high).to_numpy()
        if not (is_low | is_high).all():
            others = sorted({str(v) for v in column[~(is_low | is_high)]})
            raise ValueError(f"factor {name!r} has levels {others} besides low={low!r} and high={high!r}")
        out[name] = np.where(is_high, 1, -1)
    return pd.DataFrame(out, index=frame.index)


def cell_runs(
    frame: pd.DataFrame, levels: Mapping[str, tuple[Any, Any]], value: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The cells present: their ±1 codes (n_cells, n_factors) and each one's finite values (its runs)."""
    codes = coded(frame, levels)
    values = frame[value].to_numpy(dtype=np.float64)
    keep = np.isfinite(values)
    groups = codes[keep].assign(_value=values[keep]).groupby(list(levels), sort=True)["_value"]
    cells = np.array([key if isinstance(key, tuple) else (key,) for key in groups.groups], dtype=np.int64)
    return cells.reshape(len(cells), len(levels)), [group.to_numpy() for _, group in groups]


def contrast(signs: np.ndarray) -> np.ndarray:
    """Weights over cells that give mean(cells at +1) − mean(cells at −1); NaN when a side is empty."""
    high, low = signs > 0, signs < 0
    if not high.any() or not low.any():
        return np.full(len(signs), np.nan)
    return high / high.sum() - low / low.sum()


def effects(
    frame: pd.DataFrame,
    levels: Mapping[str, tuple[Any, Any]],
    value: str,
    *,
    interactions: bool = True,
    ci: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> pd.DataFrame:
    """Main effects (and two-way interactions) of `levels`' factors on the column `value`.

    One row per term: `term` ('model.norm' or 'model.norm × optim.name'), `factors` (a tuple),
    `effect`, its bootstrap CI `lo`, `hi` (NaN when no cell has two finite runs to resample),
    `low_mean` and `high_mean` (the mean of the cells on each side of the contrast: for A×B the cells
    where A and B differ, and where they agree), `n_cells`, `n_runs`. Runs whose
    value is NaN (a diverged run's final loss) are left out of their cell.
    """
    names = list(levels)
    cells, runs = cell_runs(frame, levels, value)
    terms: list[tuple[str, ...]] = [(name,) for name in names]
    if interactions:
        terms += list(combinations(names, 2))
    index = {name: i for i, name in enumerate(names)}
    weights = np.array([contrast(np.prod(cells[:, [index[f] for f in term]], axis=1)) for term in terms])
    scale = np.array([len(term) for term in terms], dtype=np.float64)[:, None]  # 2 for A×B: see above
    means = np.array([r.mean() for r in runs])
    resampled = bootstrap_cell_means(runs, n_boot, seed)  # (n_boot, n_cells)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    resamplable = any(len(r) > 1 for r in runs)
    rows = []
    for term, w, k in zip(terms, weights, scale[:, 0], strict=True):
        boot = resampled @ w * k
        lo, hi = np.quantile(boot, [lo_q, hi_q]) if resamplable and np.isfinite(w).all() else (math.nan,) * 2
        rows.append(
            {
                "term": " × ".join(term),
                "factors": term,
                "effect": float(means @ w * k),
                "lo": float(lo),
                "hi": float(hi),
                "low_mean": float(means @ np.where(w < 0, -w, 0)),
                "high_mean": float(means @ np.where(w > 0, w, 0)),
                "n_cells": len(runs),
                "n_runs": int(sum(len(r) for r in runs)),
            }
        )
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def bootstrap_cell_means(runs: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cells): each cell's mean over its runs drawn with replacement (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(runs)))
    for j, x in enumerate(runs):
        out[:, j] = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return out


def steps_to_threshold(dynamics: pd.DataFrame, quantity: str, threshold: float) -> pd.Series:
    """Per run_id, the first logged step at which `quantity` is at or below `threshold` (NaN: never)."""
    rows = dynamics.loc[(dynamics["quantity"] == quantity) & (dynamics["value"] <= threshold)]
    first = rows.assign(run_id=rows["run_id"].astype(object)).groupby("run_id")["step"].min()
    every = pd.Index(dynamics["run_id"].astype(object).unique(), name="run_id")
    return first.reindex(every).astype("float64").rename(f"steps_to_{quantity}_{threshold:g}")


def sentence(
    row: pd.Series | Mapping[str, Any], what: str, unit: str = "", names: Mapping[str, str] | None = None
) -> str:
    """One effect in plain words: 'batchnorm lowers the final validation loss by 1.2 [0.9, 1.5] nats
    on average over the other practices'. `names` turns a factor's column into the practice's name."""
    names = names or {}
    term = " and ".join(names.get(f, f) for f in row["factors"])
    effect, lo, hi = row["effect"], row["lo"], row["hi"]
    if not math.isfinite(effect):
        return f"{term}: no estimate (a level has no finite run)"
    if effect == 0:
        return f"{term}: no change in {what}"
    unit = f" {unit}" if unit else ""
    if not math.isfinite(lo):
        interval = f"{unit} (one seed: no interval)"
    elif lo * hi > 0:
        a, b = sorted((abs(lo), abs(hi)))
        interval = f" [{a:.3g}, {b:.3g}]{unit}"
    else:
        interval = f"{unit} (95% CI {lo:+.3g} to {hi:+.3g} includes no effect)"
    size = f"{abs(effect):.3g}{interval}"
    if len(row["factors"]) > 1:
        verb = "raise" if effect > 0 else "lower"
        return f"{term}: together they {verb} {what} by {size} more than their separate effects add up to"
    verb = "raises" if effect > 0 else "lowers"
    return f"{term} {verb} {what} by {size} on average over the other practices"
