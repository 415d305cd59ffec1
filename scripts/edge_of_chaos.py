"""The edge of chaos, measured: δ gain through a deep tanh MLP at initialization against the mean-field
prediction of bpexp.theory, across σ_w² and σ_b² (Schoenholz et al. 2017, "Deep Information Propagation").

For each (σ_w², σ_b², seed) it builds the net with bpexp.model.build_mlp (lecun_normal, init_gain = σ_w,
bias_std = σ_b), runs one forward/backward pass in float64 on x ~ N(0, I), y ~ N(0, 1) with MSE loss, and
reads ‖δ^(l)‖_F = ‖∂L/∂z^(l)‖_F off autograd. The figure plots delta/log10_ratio = log10(‖δ^(1)‖/‖δ^(L)‖)
measured (markers, mean ± spread over seeds) and predicted along the q trajectory (lines) against σ_w²,
the fixed-point-only prediction (dotted) for contrast, and the edge of chaos χ1(q*) = 1 per σ_b².

    python scripts/edge_of_chaos.py --out edge_of_chaos.png          # ~10 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from bpexp import theory
from bpexp.config import Activation, Init, ModelConfig
from bpexp.model import build_mlp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=30, help="hidden layers (L = depth + 1)")
    p.add_argument("--width", type=int, default=256, help="units per hidden layer (and input dimension)")
    p.add_argument("--batch", type=int, default=64, help="examples in the one forward/backward pass")
    p.add_argument("--sigma-w2", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--sigma-b2", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--seeds", type=int, default=2, help="seeds per point (0 … seeds−1)")
    p.add_argument(
        "--activation", default="tanh", choices=[a.value for a in Activation], help="hidden nonlinearity"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default="edge_of_chaos.png", help="where to write the PNG")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, sigma_w2: float, sigma_b2: float) -> ModelConfig:
    return ModelConfig(
        depth=args.depth,
        width=args.width,
        activation=Activation(args.activation),
        init=Init.lecun_normal,  # W ~ N(0, σ_w²/fan_in)
        init_gain=math.sqrt(sigma_w2),
        bias_std=math.sqrt(sigma_b2),
    )


def measured_delta_log10(cfg: ModelConfig, batch: int, seed: int) -> np.ndarray:
    """log10‖δ^(l)‖_F, l = 1 … L, at initialization (float64: deep nets reach norms float32 flushes to 0)."""
    torch.manual_seed(seed)
    model = build_mlp(cfg, cfg.width, 1).double()
    x = torch.randn(batch, cfg.width, dtype=torch.float64)  # in_dim = width, mean(x²) ≈ 1
    y = torch.randn(batch, 1, dtype=torch.float64)
    out, zs, _ = model.trace(x)
    torch.nn.functional.mse_loss(out, y).backward()
    return np.log10([z.grad.norm().item() for z in zs])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    act = Activation(args.activation)
    start = time.perf_counter()
    dense = np.geomspace(min(args.sigma_w2), max(args.sigma_w2), 60)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, (ax, ax_layers) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    print(f"{'σ_w²':>6} {'σ_b²':>6} {'χ1(q*)':>8} {'predicted':>10} {'measured':>10} {'± sd':>6}")
    for i, b2 in enumerate(args.sigma_b2):
        color = colors[i % len(colors)]
        label = f"σ_b² = {b2:g}"
        # predictions on a dense grid: along the trajectory, and from the fixed point alone
        preds = [theory.predict(model_config(args, w2, b2), args.width, 1) for w2 in dense]
        ax.plot(dense, [p.delta_log10_ratio for p in preds], color=color, label=f"{label}: predicted")
        fixed_only = [args.depth / 2 * math.log10(p.chi1) for p in preds]
        ax.plot(
            dense,
            fixed_only,
            color=color,
            ls=":",
            lw=1.2,
            label=f"{label}: fixed point only, depth/2·log10 χ1(q*)",
        )
        # measured points
        for w2 in args.sigma_w2:
            cfg = model_config(args, w2, b2)
            p = theory.predict(cfg, args.width, 1)
            runs = np.array([measured_delta_log10(cfg, args.batch, s) for s in range(args.seeds)])
            rel = runs - runs[:, -1:]  # log10‖δ^(l)‖ − log10‖δ^(L)‖, (seeds, L)
            ratio, sd = rel[:, 0].mean(), rel[:, 0].std()
            print(f"{w2:6.2f} {b2:6.3f} {p.chi1:8.3f} {p.delta_log10_ratio:+10.3f} {ratio:+10.3f} {sd:6.3f}")
            ax.errorbar(w2, ratio, yerr=sd, fmt="o", color=color, ms=6, mfc="white", mew=1.5, capsize=3)
            if i == 0:
                layers = np.arange(1, rel.shape[1] + 1)
                (line,) = ax_layers.plot(layers, rel.mean(axis=0), "o", ms=3, label=f"σ_w² = {w2:g}")
                ax_layers.plot(layers, p.delta_log10, color=line.get_color(), lw=1)
        edge = theory.edge_of_chaos(act, b2)
        if math.isfinite(edge):
            ax.axvline(edge, color=color, ls="--", lw=1)
            ax.annotate(
                f"χ1 = 1\nσ_w² = {edge:.2f}",
                (edge, 0.97),
                xycoords=("data", "axes fraction"),
                ha="left",
                va="top",
                fontsize=8,
                color=color,
                xytext=(3, 0),
                textcoords="offset points",
            )
    ax.plot([], [], "o", color="gray", mfc="white", label=f"measured (mean ± sd, {args.seeds} seeds)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.sigma_w2, [f"{w:g}" for w in args.sigma_w2])
    ax.set_xlabel("σ_w²  (weights ~ N(0, σ_w²/fan_in))")
    ax.set_ylabel("log10(‖δ^(1)‖ / ‖δ^(L)‖)   (delta/log10_ratio)")
    ax.set_title(f"{act.value} MLP at init, depth {args.depth}, width {args.width}: <0 vanishes, >0 explodes")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ax_layers.axhline(0, color="black", lw=0.6)
    ax_layers.set_xlabel("layer l  (L = output layer)")
    ax_layers.set_ylabel("log10‖δ^(l)‖ − log10‖δ^(L)‖")
    ax_layers.set_title(f"per layer, σ_b² = {args.sigma_b2[0]:g}: measured (dots), predicted (lines)")
    ax_layers.legend(fontsize=7, ncol=2)
    ax_layers.grid(alpha=0.3)

    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
