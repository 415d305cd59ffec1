"""What the new instruments cost, as ratios to one training step of the same net, side by side in one process.

    python scripts/bench_instruments.py            # the table (about a minute on 2 cores)
    python scripts/bench_instruments.py --quick    # fewer repetitions, to check that it runs

Rows: per-example gradient noise (tr Σ, B_simple, GSNR) on a probe step's δ and layer inputs at the default
size (depth 4 × width 64, batch 128); sharpness by 20 Hessian-vector products at depth 8 × width 64, also
amortized over 50 steps; the Jacobian spectrum at initialization at depth 32 × width 256 (8 inputs).
A training step is forward, backward of the mean MSE loss, SGD step, zero_grad, as in the bare loop of
scripts/bench.py. Each variant alternates with its step within a repetition; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bpexp import instruments
from bpexp.config import Activation, ModelConfig
from bpexp.model import build_mlp

IN_DIM, OUT_DIM, BATCH = 16, 4, 128


def seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of fn over `repeat` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def net(depth: int, width: int, in_dim: int = IN_DIM):
    torch.manual_seed(0)
    model = build_mlp(ModelConfig(depth=depth, width=width, activation=Activation.tanh), in_dim, OUT_DIM)
    x, y = torch.randn(BATCH, in_dim), torch.randn(BATCH, OUT_DIM)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, x, y, step


def layer_pass(model, x, y) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """δ^(l) (of the mean loss) and the layer inputs a^(l-1), as a probe step holds them."""
    zs, inputs, a = [], [], x
    for l, linear in enumerate(model.linears, start=1):
        inputs.append(a.detach())
        z = linear(a)
        z.retain_grad()
        zs.append(z)
        a = z if l == len(model.linears) else model.f(z)
    F.mse_loss(a, y).backward()
    model.zero_grad(set_to_none=True)
    return [z.grad for z in zs], inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    repeat = 5 if parser.parse_args().quick else 50
    torch.set_num_threads(1)
    rows = []

    model, x, y, step = net(4, 64)
    delta, inputs = layer_pass(model, x, y)

    def noise() -> None:
        stats = instruments.gradient_noise(delta, inputs)
        torch.stack(list(stats.metrics().values())).tolist()  # the probe step's one host sync

    rows.append(
        ("gradient noise, depth 4 × width 64, batch 128", seconds(noise, repeat), seconds(step, repeat))
    )

    model, x, y, step = net(8, 64)
    params = list(model.parameters())
    state: dict[str, list[torch.Tensor] | None] = {"vector": None}

    def sharpness() -> None:
        found = instruments.top_hessian_eigenvalue(
            lambda: F.mse_loss(model(x), y), params, iters=20, start=state["vector"]
        )
        state["vector"] = found.vector
        found.top.item()

    rows.append(("sharpness, 20 HVPs, depth 8 × width 64", seconds(sharpness, repeat), seconds(step, repeat)))

    model, x, y, step = net(32, 256, in_dim=256)
    weights = [lin.weight for lin in model.linears]
    biases = [lin.bias for lin in model.linears]
    probe_x = x[:8]

    def jacobian() -> None:
        instruments.jacobian_spectrum(weights, biases, model.activation, probe_x).sv2_nvar.item()

    rows.append(
        (
            "Jacobian spectrum, 8 inputs, depth 32 × width 256",
            seconds(jacobian, max(3, repeat // 5)),
            seconds(step, repeat),
        )
    )

    print(f"{'instrument':52s} {'ms':>9s} {'step ms':>9s} {'× step':>8s}")
    for name, cost, step_cost in rows:
        print(f"{name:52s} {1e3 * cost:9.3f} {1e3 * step_cost:9.3f} {cost / step_cost:8.2f}")
    _, cost, step_cost = rows[1]
    print(
        f"sharpness every 50 steps: {1 + cost / step_cost / 50:.2f}× the bare loop (probes and logging aside)"
    )


if __name__ == "__main__":
    main()
