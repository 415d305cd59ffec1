"""Populations against lone runs, side by side in one process (numbers for the README, not a test).

1. A whole sweep of the default experiment, command start to exit, every run in MLflow:
   hydra/launcher=batched against the basic launcher (target ≥ 10×).
2. Per member-step at the default probe interval against a bare batched loop of the same population
   (forward, backward, Adam, no probes, no evaluation, no bookkeeping; target within 1.5×), and an
   M = 1 population against today's lone train() loop (is "a run is a population of one" as fast?).
3. Peak memory of the population's training against stacked params + optimizer state + activations:
   the params' bytes plus the most bytes torch's CPU allocator held at once for tensors made during
   training (torch.profiler with profile_memory: every allocation and free), over the first probe
   steps and an evaluation (where the peak is: probe steps keep δ and activations).

    python scripts/bench_population.py --seeds 64     # taskset -c 0,1 for the 2-core figure
    python scripts/bench_population.py --seeds 64 --skip-sweeps model.width=256   # your population's
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bpexp.config import to_config
from bpexp.population import Population
from bpexp.train import train

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(launcher: str, seeds: int, folder: Path) -> float:
    """The whole command in a folder of its own: each creates its own store, as a new user's would."""
    command = [sys.executable, "-m", "bpexp.train", "-m", f"hydra/launcher={launcher}"]
    command.append(f"seed=range({seeds})")
    (folder / launcher).mkdir()
    start = time.perf_counter()
    subprocess.run(command, cwd=folder / launcher, check=True, capture_output=True)
    return time.perf_counter() - start


def configs(seeds: int, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return [to_config(compose("train", [f"seed={s}", "tracking=none", *overrides])) for s in range(seeds)]


def bare_loop_seconds(population: Population, steps: int) -> float:
    """The floor: forward, backward and the optimizer over the stacked nets, nothing else."""
    start = time.perf_counter()
    for _ in range(steps):
        x, y = population.next_batches()
        population.loss(population.forward(x)[0], y).sum().backward()
        population.optimizer.step(population.active_mask())
        for p in population.parameters():
            p.grad = None
    return time.perf_counter() - start


def estimate_bytes(population: Population) -> int:
    """Stacked params, their grads, Adam's two moments, and one step's activations (z, f(z), masks)."""
    params = sum(p.numel() * p.element_size() for p in population.parameters())
    cfg = population.cfg
    batch = cfg.train.batch_size or len(population.members[0].data.x_train)
    units = sum(w.shape[1] for w in population.weights)  # per example and member
    activations = 3 * population.M * batch * units * population.weights[0].element_size()
    return 4 * params + activations


def peak_training_bytes(population: Population, folder: Path) -> int:
    """Stacked params (allocated before) plus the allocator's peak of what training allocates."""
    from torch.profiler import ProfilerActivity, profile

    params = sum(p.numel() * p.element_size() for p in population.parameters())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        population.train()
    trace = folder / "memory.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    held = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return params + max(held, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--skip-sweeps", action="store_true")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the population's config (model.width=256 …): with --skip-sweeps, "
        "its peak memory sizes hydra.launcher.max_members",
    )
    args = parser.parse_args()
    if not args.skip_sweeps:
        with tempfile.TemporaryDirectory() as folder:
            batched = sweep_seconds("batched", args.seeds, Path(folder))
            basic = sweep_seconds("basic", args.seeds, Path(folder))
        print(
            f"sweep of {args.seeds} seeds: basic {basic:.1f} s, batched {batched:.1f} s: "
            f"{basic / batched:.1f}×"
        )

    cfgs = configs(args.seeds, *args.overrides)
    steps = cfgs[0].train.steps
    population = Population(cfgs)
    start = time.perf_counter()
    population.train()
    full = time.perf_counter() - start
    bare = bare_loop_seconds(Population(cfgs), steps)
    per = 1e6 / (args.seeds * steps)
    print(
        f"per member-step ({args.seeds} members, {steps} steps, probes every {cfgs[0].probes.every}): "
        f"{full * per:.1f} µs, bare loop {bare * per:.1f} µs: {full / bare:.2f}×"
    )
    short = configs(args.seeds, *args.overrides, f"train.steps={2 * cfgs[0].probes.every + 1}")
    population = Population(short)
    estimate = estimate_bytes(population)
    with tempfile.TemporaryDirectory() as folder:
        peak = peak_training_bytes(population, Path(folder))
    print(
        f"peak memory (params + allocator peak in training) {peak / 2**20:.1f} MiB vs estimate "
        f"{estimate / 2**20:.1f} MiB: {peak / estimate:.2f}×"
    )

    one = configs(1, *args.overrides)
    start = time.perf_counter()
    Population(one).train()
    as_population = time.perf_counter() - start
    lone = train(one[0], out_dir=Path(tempfile.mkdtemp()))
    print(f"M = 1: population {as_population:.2f} s vs lone train() loop {lone.loop_seconds:.2f} s")
    print(f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
