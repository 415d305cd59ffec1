"""The report's answers for designed studies: a factorial study's effects, and the trainability map.

Each section reads the per-run summary (`analysis.summarize`) of one sweep and returns its Markdown and
its figures, or nothing when the sweep is not that kind of study:

- **Effects** (any sweep whose runs carry `factors.*` params, e.g. `experiment=best_practices`): the
  main effect of each practice and the largest two-way interactions on the final validation loss and
  on the share of runs that diverged, with bootstrap CIs over seeds (bpexp.effects), a forest plot,
  and one sentence per practice.
- **Trainability** (a sweep over `model.depth` × `model.init_gain`, e.g. `experiment=trainability`):
  the final training loss over the grid, with the depth 6·ξ_c below which Schoenholz et al. 2017
  found nets to train drawn over it (bpexp.correlations).
- **Dynamical isometry** (a sweep over `model.depth` whose runs logged `jacobian/sv2_nvar`, e.g.
  `experiment=isometry`): the Jacobian spectrum's width against depth, measured and predicted.
- **Edge of stability** (a sweep over `optim.lr` whose runs logged `sharpness/top`, e.g.
  `experiment=edge_of_stability`): sharpness over training against 2/η.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bpexp.config import Activation, Init, ModelConfig
from bpexp.correlations import trainable_depth
from bpexp.effects import effects, sentence
from bpexp.theory import bias_variance, weight_variance

FACTOR_PREFIX = "factors."
PRACTICES = {  # factor column -> the practice's name in the report's sentences
    "factors.relu_he": "ReLU with He init",
    "factors.standardize": "standardized inputs",
    "factors.adam": "Adam",
    "factors.batchnorm": "batch norm",
    "factors.dropout": "dropout",
    "factors.clip": "gradient clipping",
}
INTERACTIONS_SHOWN = 5  # the largest |interactions| drawn and described


@dataclass
class Section:
    title: str
    lines: list[str]
    figures: dict[str, plt.Figure] = field(default_factory=dict)


def factor_columns(summary: pd.DataFrame) -> list[str]:
    """The `factors.*` params that take exactly two values across the sweep."""
    return [
        c for c in summary.columns if c.startswith(FACTOR_PREFIX) and summary[c].nunique(dropna=True) == 2
    ]


def effects_section(summary: pd.DataFrame, n_boot: int = 4000) -> Section | None:
    """Main effects and the largest interactions of the sweep's factors, or None if it has none."""
    factors = factor_columns(summary)
    if not factors:
        return None
    levels = {f: (False, True) for f in factors}
    frame = summary.assign(
        **{f: summary[f].astype(bool) for f in factors}, diverged=summary["diverged"].astype(float)
    )
    names = {f: PRACTICES.get(f, f.removeprefix(FACTOR_PREFIX)) for f in factors}
    loss = effects(frame, levels, "final_val_loss", n_boot=n_boot)
    diverged = effects(frame, levels, "diverged", n_boot=n_boot)
    shown = pick_terms(loss, len(factors))
    lines = [
        f"{len(factors)} factors, {loss['n_cells'].iloc[0]} cells, {len(summary)} runs. An effect is the "
        "change a practice makes on average over the levels of the others (cell means, seeds "
        "resampled for the 95% bootstrap CI); an interaction is how much more two practices change "
        "the value together than their separate effects add up to. Diverged runs have no final loss "
        "and count in the divergence effects instead.",
        "",
        "Final validation loss:",
        "",
        *[f"- {sentence(row, 'the final validation loss', 'nats', names)}" for _, row in shown.iterrows()],
        "",
        "Share of runs that diverged:",
        "",
        *[
            f"- {sentence(row, 'the share of diverged runs', '', names)}"
            for _, row in diverged[diverged["factors"].map(len) == 1].iterrows()
        ],
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(shown) + 1.6), sharey=True)
    forest(shown, names, axes[0], "effect on final val loss (nats)")
    forest(
        diverged.set_index("term").loc[shown["term"]].reset_index(), names, axes[1], "effect on P(diverged)"
    )
    fig.tight_layout()
    return Section("Effects", lines, {"effects": fig})


def pick_terms(table: pd.DataFrame, n_main: int) -> pd.DataFrame:
    """Every main effect, then the INTERACTIONS_SHOWN largest interactions by |effect|."""
    main = table.iloc[:n_main]
    pairs = table.iloc[n_main:]
    pairs = pairs.loc[pairs["effect"].abs().sort_values(ascending=False).index[:INTERACTIONS_SHOWN]]
    return pd.concat([main, pairs], ignore_index=True)


def forest(table: pd.DataFrame, names: dict[str, str], ax: plt.Axes, xlabel: str) -> plt.Axes:
    """One row per term: the effect as a dot, its CI as a bar, zero as a line."""
    y = np.arange(len(table))[::-1]
    labels = [" × ".join(names.get(f, f) for f in factors) for factors in table["factors"]]
    effect = table["effect"].to_numpy(dtype=float)
    lo, hi = table["lo"].to_numpy(dtype=float), table["hi"].to_numpy(dtype=float)
    err = np.vstack([effect - lo, hi - effect])
    ax.errorbar(effect, y, xerr=np.where(np.isfinite(err), err, 0), fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="0.5", lw=1)
    ax.set_yticks(y, labels)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    return ax


def sigma2(row: pd.Series) -> tuple[float, float]:
    """(σ_w², σ_b²) of a hidden layer of the run's net, as bpexp.model initializes it."""
    model = ModelConfig(
        width=int(row["model.width"]),
        init=Init(row["model.init"]),
        init_std=float(row.get("model.init_std", 0.01)),
        init_gain=float(row["model.init_gain"]),
        bias_std=float(row.get("model.bias_std", 0.0)),
    )
    return weight_variance(model, model.width, model.width), bias_variance(model, model.width)


def trainability_section(summary: pd.DataFrame) -> Section | None:
    """The final training loss over depth × σ_w², with 6·ξ_c drawn over it; None for other sweeps."""
    needed = ["model.depth", "model.init_gain", "model.activation", "model.width", "model.init"]
    if any(c not in summary for c in needed) or summary["model.activation"].nunique() != 1:
        return None
    if summary["model.depth"].nunique() < 3 or summary["model.init_gain"].nunique() < 3:
        return None
    activation = Activation(summary["model.activation"].iloc[0])
    table = summary.assign(
        sigma_w2=[sigma2(row)[0] for _, row in summary.iterrows()],
        loss=summary["train/loss"].where(summary["outcome"] == "completed"),
    )
    sigma_b2 = sigma2(summary.iloc[0])[1]
    grid = table.pivot_table(index="model.depth", columns="sigma_w2", values="loss", aggfunc="median")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w2, depth = grid.columns.to_numpy(dtype=float), grid.index.to_numpy(dtype=float)
    image = ax.pcolormesh(
        edges(w2), edges(depth, log=True), np.ma.masked_invalid(grid.to_numpy(dtype=float)), cmap="viridis_r"
    )
    fig.colorbar(image, ax=ax, label="final training loss (white: diverged)")
    fine = np.linspace(w2.min(), w2.max(), 200)
    line = np.array([trainable_depth(activation, w, sigma_b2) for w in fine])
    ax.plot(fine, line, color="crimson", lw=2, label=r"$6\,\xi_c$ (Schoenholz et al. 2017)")
    ax.set_yscale("log")
    ax.set_ylim(edges(depth, log=True)[[0, -1]])
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel("depth (hidden layers)")
    ax.set_title(f"{activation.value}, σ_b² = {sigma_b2:.3g}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    lines = [
        f"Final training loss of {activation.value} nets over depth × σ_w² at σ_b² = {sigma_b2:.3g} "
        "(median over seeds; a diverged run is left white). The line is 6·ξ_c, the depth below which "
        "Schoenholz et al. 2017 found nets to train; a net trains in the region below it.",
        "",
        *trainability_lines(grid, activation, sigma_b2),
    ]
    return Section("Trainability", lines, {"trainability": fig})


def trainability_lines(grid: pd.DataFrame, activation: Activation, sigma_b2: float) -> list[str]:
    """How often the theory's line separates trained from untrained cells (trained: loss below half
    the worst finite loss of the grid)."""
    values = grid.to_numpy(dtype=float)
    if not np.isfinite(values).any():
        return []
    trained = values < 0.5 * np.nanmax(values)
    inside = np.array(
        [[d <= trainable_depth(activation, w, sigma_b2) for w in grid.columns] for d in grid.index]
    )
    agree = int(np.sum(trained == inside))
    return [
        f"Theory and measurement agree on {agree} of {values.size} cells"
        " (trained: below half the worst loss)."
    ]


def edges(centres: np.ndarray, log: bool = False) -> np.ndarray:
    """Cell edges halfway between sorted centres (in log space if log), extended at both ends."""
    x = np.log(centres) if log else np.asarray(centres, dtype=float)
    mid = (x[1:] + x[:-1]) / 2
    out = np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])
    return np.exp(out) if log else out


def sections(summary: pd.DataFrame, dynamics: pd.DataFrame | None = None) -> list[Section]:
    """The study sections this sweep has, in report order."""
    found = [
        effects_section(summary),
        trainability_section(summary),
        isometry_section(summary),
        edge_of_stability_section(summary, dynamics),
    ]
    return [s for s in found if s is not None]


# The instruments' studies: dynamical isometry at initialization, and the edge of stability.
HOVERS = (0.8, 1.25)  # sharpness over the last half of training within these factors of 2/η: at the edge


def isometry_section(summary: pd.DataFrame) -> Section | None:
    """The Jacobian's scale-free spread (m2 − m1²)/m1² of σ² against depth, measured (markers) and
    predicted (lines, Pennington et al. 2017), one colour per activation × init; None for other sweeps."""
    needed = ["model.depth", "model.activation", "model.init", "jacobian/sv2_nvar"]
    if any(c not in summary for c in needed) or summary["model.depth"].nunique() < 3:
        return None
    theory = "theory/jacobian_sv2_nvar"
    table = summary.assign(theory=summary.get(theory, np.nan))
    groups = table.groupby(["model.activation", "model.init"], sort=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [
        "Spread of the squared singular values of the input-output Jacobian J = ∂a^(L−1)/∂x at "
        "initialization, (m2 − m1²)/m1² (0 = dynamical isometry: every singular value equal), against "
        "depth; markers: measured (median over the inputs' spectra and seeds), lines: the free-probability "
        "prediction of Pennington, Schoenholz & Ganguli 2017 at infinite width.",
        "",
        "| activation | init | depth | measured | theory |",
        "| --- | --- | --- | --- | --- |",
    ]
    activations = sorted(table["model.activation"].unique())
    inits = sorted(table["model.init"].unique())
    for (activation, init), group in groups:
        by_depth = group.groupby("model.depth")[["jacobian/sv2_nvar", "theory"]].median().sort_index()
        depth = by_depth.index.to_numpy(dtype=float)
        color = plt.cm.tab10.colors[activations.index(activation) % 10]
        style = ("o", "-") if inits.index(init) % 2 == 0 else ("s", "--")
        ax.plot(
            depth,
            by_depth["jacobian/sv2_nvar"],
            style[0],
            color=color,
            mfc="none",
            label=f"{activation}, {init}",
        )
        ax.plot(depth, by_depth["theory"], style[1], color=color, alpha=0.7)
        deepest = by_depth.iloc[-1]
        lines.append(
            f"| {activation} | {init} | {int(depth[-1])} | {deepest['jacobian/sv2_nvar']:.3g} "
            f"| {deepest['theory']:.3g} |"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel(r"$(m_2 - m_1^2)/m_1^2$ of $\sigma^2(J)$")
    ax.set_title("Jacobian spectrum width at init (markers: measured, lines: theory)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Section("Dynamical isometry", lines, {"isometry": fig})


def edge_of_stability_section(summary: pd.DataFrame, dynamics: pd.DataFrame | None) -> Section | None:
    """sharpness/top over training against 2/η for each step size (Cohen et al. 2021); None without it."""
    if dynamics is None or "optim.lr" not in summary or summary["optim.lr"].nunique() < 2:
        return None
    top = dynamics[dynamics["quantity"] == "sharpness/top"]
    if top.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [
        "Top eigenvalue of the training loss's Hessian (sharpness) during training, one colour per step "
        "size η; the dashed line of each colour is 2/η, where gradient descent on a quadratic stops being "
        "stable (Cohen et al. 2021). Late: the median sharpness over the last half of training.",
        "",
        "| η | 2/η | peak sharpness | late sharpness | late / (2/η) |",
        "| --- | --- | --- | --- | --- |",
    ]
    ordered = summary.assign(lr=summary["optim.lr"].astype(float)).sort_values("lr")
    for color, (_, run) in zip(
        plt.cm.viridis(np.linspace(0, 0.9, len(ordered))), ordered.iterrows(), strict=True
    ):
        series = top[top["run_id"].astype(str) == str(run["run_id"])].sort_values("step")
        if series.empty:
            continue
        lr, edge = float(run["lr"]), 2.0 / float(run["lr"])
        ax.plot(series["step"], series["value"], color=color, label=f"η = {lr:g}")
        ax.axhline(edge, color=color, ls="--", lw=1)
        late = series[series["step"] >= series["step"].max() / 2]["value"].median()
        lines.append(
            f"| {lr:g} | {edge:.4g} | {series['value'].max():.4g} | {late:.4g} | {late / edge:.2f} |"
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (top Hessian eigenvalue)")
    ax.set_title("Sharpness under full-batch gradient descent; dashed: 2/η")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Section("Edge of stability", lines, {"edge_of_stability": fig})
