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
