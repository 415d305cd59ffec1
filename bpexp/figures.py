"""Figures from a dynamics table (step, layer, quantity, value): pure functions, each returns its Axes.

Used by a run for its own plots and by the sweep report; imports no training code.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: runs and reports draw without a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator


def layer_profile(dynamics: pd.DataFrame, quantity: str, ax: Axes | None = None, max_lines: int = 8) -> Axes:
    """‖·^(l)‖ against layer l on a log axis, one line per probe step (darker = later)."""
    ax = ax or plt.gca()
    rows = dynamics[(dynamics["quantity"] == quantity) & dynamics["layer"].notna()]
    steps = np.unique(rows["step"])
    if len(steps) > max_lines:  # evenly spaced steps, always the first and the last
        steps = steps[np.unique(np.linspace(0, len(steps) - 1, max_lines).round().astype(int))]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(steps)))
    for step, color in zip(steps, colors, strict=True):
        at = rows[rows["step"] == step].sort_values("layer")
        ax.plot(
            at["layer"], at["value"].clip(lower=1e-300), marker="o", ms=3, color=color, label=f"step {step}"
        )
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer l (1 = input side)")
    ax.set_ylabel(quantity)
    ax.grid(True, which="major", alpha=0.3)
    return ax


def gradient_profile_figure(dynamics: pd.DataFrame, title: str = "") -> plt.Figure:
    """The run's per-layer profile of ‖δ^(l)‖ (the error signal) and ‖∂L/∂W^(l)‖ over training."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    layer_profile(dynamics, "delta_norm", ax=left).set_title("error signal ‖δ^(l)‖ = ‖∂L/∂z^(l)‖")
    layer_profile(dynamics, "grad_norm", ax=right).set_title("weight gradient ‖∂L/∂W^(l)‖")
    if left.lines:
        right.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------------
# Sweep figures (bpexp.report): each takes plain DataFrames, draws on `ax` (default: the current Axes)
# and returns it.


def decades_apart(values: np.ndarray | pd.Series) -> bool:
    """True when positive values span more than a decade: then a log axis reads better."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() > 10


def log10_positive(values: np.ndarray | pd.Series) -> np.ndarray:
    """log10 of the positive finite values; NaN for zero, negative or non-finite ones (left blank)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    return np.where(ok, np.log10(np.where(ok, v, 1.0)), np.nan)


def config_profiles(
    profiles: pd.DataFrame, ax: Axes | None = None, ylabel: str = "", legend: bool = True
) -> Axes:
    """Per-layer norm against layer l, one line per config: the geometric mean over the config's runs
    (seeds), with a band from the lowest to the highest run. `profiles`: columns config, run_id, layer,
    value (one probe step per run, e.g. initialization)."""
    ax = ax or plt.gca()
    configs = list(dict.fromkeys(profiles["config"]))
    colors = plt.cm.tab10 if len(configs) <= 10 else plt.cm.tab20
    for i, config in enumerate(configs):
        rows = profiles[profiles["config"] == config]
        logs = log10_positive(rows["value"])  # a zero norm (a dead layer) cannot sit on a log axis
        by_layer = pd.Series(logs, index=rows["layer"].to_numpy(dtype=np.int64)).groupby(level=0)
        mean, lo, hi = by_layer.mean(), by_layer.min(), by_layer.max()
        color = colors(i % colors.N)
        ax.plot(mean.index, 10**mean, marker="o", ms=3, color=color, label=config)
        if (hi > lo).any():
            ax.fill_between(mean.index, 10**lo, 10**hi, color=color, alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer l (1 = input side)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if legend and configs:
        ax.legend(fontsize="small")
    return ax


def layer_step_heatmap(
    dynamics: pd.DataFrame,
    quantity: str = "grad_norm",
    ax: Axes | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str | None = None,
) -> Axes:
    """log10 of a per-layer quantity of one run as a layer × step map (rows: layers, input side at the
    bottom; columns: probe steps). Non-finite values are left blank."""
    ax = ax or plt.gca()
    rows = dynamics[(dynamics["quantity"] == quantity) & dynamics["layer"].notna()]
    table = rows.pivot_table(index="layer", columns="step", values="value", aggfunc="last", dropna=False)
    logs = np.ma.masked_invalid(log10_positive(table.to_numpy(dtype=np.float64).ravel()).reshape(table.shape))
    steps = table.columns.to_numpy(dtype=np.float64)
    layers = table.index.to_numpy(dtype=np.float64)
    mesh = ax.pcolormesh(
        edges(steps), edges(layers), logs, cmap="magma", vmin=vmin, vmax=vmax, shading="flat"
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("layer l (1 = input side)")
    if colorbar:
        ax.figure.colorbar(mesh, ax=ax, label=label or f"log10 {quantity}")
    return ax


def edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges halfway between sorted centers (probe steps need not be evenly spaced)."""
    if len(centers) == 0:
        return np.array([0.0, 1.0])
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def lines_with_bands(
    table: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    ax: Axes | None = None,
    log: bool | None = None,
    ylabel: str = "",
) -> Axes:
    """`<y>_mean` against x, one line per hue value, with a band from `<y>_lo` to `<y>_hi` (a CI).
    log=None: a log y axis when the means span more than a decade."""
    ax = ax or plt.gca()
    groups = table.groupby(hue, sort=False, dropna=False) if hue else [(None, table)]
    for i, (name, rows) in enumerate(groups):
        rows = rows.sort_values(x)
        color = plt.cm.tab10(i % 10)
        ax.plot(
            rows[x],
            rows[f"{y}_mean"],
            marker="o",
            ms=4,
            color=color,
            label=None if hue is None else str(name),
        )
        ax.fill_between(rows[x], rows[f"{y}_lo"], rows[f"{y}_hi"], color=color, alpha=0.18, lw=0)
    if log or (log is None and decades_apart(table[f"{y}_mean"])):
        ax.set_yscale("log")
    if table[x].dtype.kind in "iu" or str(table[x].dtype) == "Int64":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, which="major", alpha=0.3)
    if hue:
        ax.legend(fontsize="small", title=hue)
    return ax


def bars_with_ci(
    table: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    runs: pd.DataFrame | None = None,
    ax: Axes | None = None,
    log: bool | None = None,
    ylabel: str = "",
) -> Axes:
    """`<y>_mean` per x value as bars (side by side per hue value) with `<y>_lo` to `<y>_hi` (a CI) as
    error bars; `runs` (columns x, hue and y, one row per run) adds every run as a dot on its bar, the
    spread over seeds. x and hue values are drawn as text, in the table's order."""
    ax = ax or plt.gca()
    slots = {value: i for i, value in enumerate(dict.fromkeys(table[x]))}
    hues = list(dict.fromkeys(table[hue])) if hue else [None]
    width = 0.8 / len(hues)
    for i, name in enumerate(hues):
        rows = table if hue is None else table[table[hue] == name]
        at = rows[x].map(slots).to_numpy(dtype=np.float64) - 0.4 + width * (i + 0.5)
        mean = rows[f"{y}_mean"].to_numpy(dtype=np.float64)
        spread = np.vstack([mean - rows[f"{y}_lo"], rows[f"{y}_hi"] - mean])  # NaN (one run): no bar
        color = plt.cm.tab10(i % 10)
        label = None if hue is None else str(name)
        ax.bar(at, mean, width * 0.9, color=color, alpha=0.7, label=label)
        ax.errorbar(at, mean, yerr=np.nan_to_num(spread.clip(min=0)), fmt="none", ecolor="dimgray", capsize=4)
        if runs is not None:
            dots = runs if hue is None else runs[runs[hue] == name]
            offset = width * (i + 0.5) - 0.4
            ax.scatter(
                dots[x].map(slots) + offset, dots[y], s=16, color="black", edgecolor="white", lw=0.5, zorder=3
            )
    if log or (log is None and decades_apart(table[f"{y}_mean"])):
        ax.set_yscale("log")
    names = [str(v) for v in slots]
    if sum(map(len, names)) > 60:  # long labels would run into each other: one part ('init=…') a line
        names = [name.replace(" ", "\n") for name in names]
    widest = max((len(part) for name in names for part in name.split("\n")), default=0)
    slant = widest * len(names) > 90
    ax.set_xticks(range(len(names)), names, rotation=30 if slant else 0, ha="right" if slant else "center")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    if hue:
        ax.legend(fontsize="small", title=hue)
    return ax


def layer_lines(
    dynamics: pd.DataFrame, quantity: str = "update_ratio", ax: Axes | None = None, ylabel: str = ""
) -> Axes:
    """A per-layer quantity of one run against step, one line per layer (colour = layer, with a
    colour bar), on a log axis."""
    ax = ax or plt.gca()
    rows = dynamics[(dynamics["quantity"] == quantity) & dynamics["layer"].notna()]
    layers = np.unique(rows["layer"].to_numpy(dtype=np.int64))
    norm = matplotlib.colors.Normalize(
        vmin=layers.min() if len(layers) else 0, vmax=layers.max() if len(layers) else 1
    )
    for l in layers:
        at = rows[rows["layer"] == l].sort_values("step")
        shown = at["value"].where(at["value"] > 0)  # an exact zero (a layer that did not move) is a gap
        ax.plot(at["step"], shown, color=plt.cm.viridis(norm(l)), lw=1, marker="." if len(at) < 30 else None)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or quantity)
    ax.grid(True, which="major", alpha=0.3)
    if len(layers):
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
        bar = ax.figure.colorbar(mappable, ax=ax, label="layer l")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    return ax


def measured_vs_predicted(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    ax: Axes | None = None,
    tolerance: float = 0.5,
) -> Axes:
    """Measured y against predicted x, one point per run, with y = x and a ±tolerance band."""
    ax = ax or plt.gca()
    rows = frame[np.isfinite(frame[x].astype(float)) & np.isfinite(frame[y].astype(float))]
    groups = rows.groupby(hue, sort=True, dropna=False) if hue else [(None, rows)]
    for i, (name, at) in enumerate(groups):
        ax.scatter(at[x], at[y], s=22, color=plt.cm.tab10(i % 10), label=None if hue is None else str(name))
    if len(rows):
        lo = float(min(rows[x].min(), rows[y].min())) - tolerance
        hi = float(max(rows[x].max(), rows[y].max())) + tolerance
        line = np.array([lo, hi])
        ax.plot(line, line, color="black", lw=1, label="measured = predicted")
        ax.fill_between(line, line - tolerance, line + tolerance, color="grey", alpha=0.15, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title=hue)
    return ax
