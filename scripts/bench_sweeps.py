"""Sweeps at scale, measured: launcher throughput and the fixed cost of one job, and where it goes.

    python scripts/bench_sweeps.py            # ~5 min on 2 cores
    python scripts/bench_sweeps.py --quick    # ~1 min: shorter runs
    python scripts/bench_sweeps.py --lengths 20,400,1500   # ~6 min: where joblib starts to pay off

1. Throughput: the same 8-job sweep of small runs (digits, 8 hidden layers of 64, `--steps` SGD steps
   each) under the basic launcher (one job after another, in the launching process) and under
   `hydra/launcher=joblib hydra.launcher.n_jobs=2` (one worker per core). Reported for the whole command
   and for the sweep itself (parent run created -> parent run ended: what the launcher controls).
2. Fixed cost per job in a reused worker: a joblib sweep of tiny jobs (train.steps=1) with one worker;
   from the children's start and end times in the store, the wall time of each job after the first,
   split into the run (create, params, the step, artifacts, end) and what surrounds it (Hydra's compose
   and job setup, the sweep callback, data, model). Then the one-time cost of a fresh worker process
   (Python, imports, MLflow's store, torch's first optimizer) and the per-job phases timed in-process.
`measure()` returns all of it as a dict; bench.py prints it with `report()`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "data=digits",
    "model.depth=8",
    "model.width=64",
    "optim=sgd",
    "optim.lr=0.05",
    "probes.every=50",
]
TINY_RUN = ["data=teacher", "model.depth=2", "model.width=8", "train.steps=1", "probes.every=1"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BPEXP_"))}


def run_sweep(folder: Path, *overrides: str) -> tuple[float, object]:
    """Wall time of `python -m bpexp.train -m ...` in `folder`, and the sweep's parent run."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder}/mlflow.db"
    command = [sys.executable, "-m", "bpexp.train", "-m", f"tracking.uri={store}", *overrides]
    command.append(f"hydra.sweep.dir={folder}/multirun")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bpexp")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return wall, runs


def parent_and_children(runs: list) -> tuple[object, list]:
    parent = next(r for r in runs if r.data.tags.get("bpexp.role") == "sweep")
    return parent, sorted((r for r in runs if r is not parent), key=lambda r: r.info.start_time)


def throughput(jobs: int = 8, steps: int = 1500, workers: int = 2, rounds: int = 2) -> dict[str, float]:
    """Basic launcher vs joblib with `workers` processes on the same sweep; seconds and speedups.

    The launchers alternate for `rounds` rounds and each keeps its fastest round: on a shared machine
    the minimum is the number least disturbed by other processes."""
    seeds = "seed=" + ",".join(str(s) for s in range(jobs))
    launchers = {"basic": [], "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"]}
    out: dict[str, float] = {"jobs": jobs, "steps": steps, "workers": workers, "rounds": rounds}
    for _ in range(rounds):
        for name, launcher in launchers.items():
            with tempfile.TemporaryDirectory() as tmp:
                wall, runs = run_sweep(Path(tmp), *SMALL_RUN, f"train.steps={steps}", seeds, *launcher)
            if wall >= out.get(f"{name}_s", math.inf):
                continue
            parent, children = parent_and_children(runs)
            out[f"{name}_s"] = wall
            out[f"{name}_sweep_s"] = (parent.info.end_time - parent.info.start_time) / 1000
            out[f"{name}_run_s"] = statistics.median(
                (r.info.end_time - r.info.start_time) / 1000 for r in children
            )
    out["speedup"] = out["basic_s"] / out["joblib_s"]
    out["sweep_speedup"] = out["basic_sweep_s"] / out["joblib_sweep_s"]
    return out


def reused_worker(jobs: int = 8) -> dict[str, float]:
    """Per-job wall time in one reused joblib worker, tiny jobs: run vs what surrounds it."""
    seeds = "seed=" + ",".join(str(s) for s in range(jobs))
    with tempfile.TemporaryDirectory() as tmp:
        wall, runs = run_sweep(
            Path(tmp), *TINY_RUN, seeds, "hydra/launcher=joblib", "hydra.launcher.n_jobs=1"
        )
    parent, children = parent_and_children(runs)
    starts = [r.info.start_time / 1000 for r in children]
    ends = [r.info.end_time / 1000 for r in children]
    per_job = [b - a for a, b in itertools.pairwise(starts[1:])]  # after the first (warm-up) job
    inside = [e - s for s, e in zip(starts[1:], ends[1:], strict=True)]
    outside = [s - e for e, s in zip(ends[1:-1], starts[2:], strict=True)]
    return {
        "worker_first_run_s": starts[0]
        - parent.info.start_time / 1000,  # cold worker: spawn, imports, 1st job
        "per_job_s": statistics.median(per_job),
        "per_job_max_s": max(per_job),
        "in_run_s": statistics.median(inside),
        "around_run_s": statistics.median(outside),
        "tiny_sweep_s": wall,
    }


def fresh_process() -> dict[str, float]:
    """One-time cost of a new worker: Python, the imports of bpexp.train, MLflow's store, torch's first
    optimizer (it imports torch._dynamo), each in a fresh interpreter."""
    probes = {
        "python_s": "pass",
        "import_train_s": "import bpexp.train",
        "import_mlflow_store_s": "import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store",
        "first_optimizer_s": "import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)",
    }
    out = {}
    for name, code in probes.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=clean_env(), capture_output=True)
        out[name] = time.perf_counter() - start
    for name in ("import_train_s", "import_mlflow_store_s", "first_optimizer_s"):
        out[name] -= out["python_s"]
    return out


def phases(repeats: int = 5) -> dict[str, float]:
    """Per-job phases in a warm process (medians): compose, data + model, run creation, run end."""
    import shutil

    import torch
    from hydra import compose, initialize_config_dir

    from bpexp.config import config_hash, flatten, to_config
    from bpexp.data import make_data
    from bpexp.model import build_mlp
    from bpexp.tracking import make_tracker
    from bpexp.train import train

    times: dict[str, list[float]] = {
        "compose_s": [],
        "data_model_s": [],
        "run_create_s": [],
        "train_total_s": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweeps-"))
    overrides = [*TINY_RUN, f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                cfg = to_config(compose("train", overrides=[*overrides, f"seed={i}"]))
                t1 = time.perf_counter()
                data = make_data(cfg.data, cfg.seed)
                build_mlp(cfg.model, data.in_dim, data.out_dim)
                t2 = time.perf_counter()
                tracker = make_tracker(cfg.tracking, tmp)
                tracker.start("bench", flatten(cfg), {"bpexp.config_hash": config_hash(cfg)})
                tracker.end("FINISHED")
                t3 = time.perf_counter()
                train(cfg, launch_dir=tmp, out_dir=tmp / f"o{i}")
                t4 = time.perf_counter()
                if i:  # the first pass warms up imports, torch._dynamo, matplotlib's fonts
                    times["compose_s"].append(t1 - t0)
                    times["data_model_s"].append(t2 - t1)
                    times["run_create_s"].append(t3 - t2)
                    times["train_total_s"].append(t4 - t3)
        torch.set_num_threads(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {k: statistics.median(v) for k, v in times.items()}
    # train() with one step = data + model + run creation + 1 step + artifacts (figure, parquet) + end
    out["run_end_s"] = max(0.0, out["train_total_s"] - out["data_model_s"] - out["run_create_s"])
    return out


def measure(quick: bool = False) -> dict[str, dict[str, float]]:
    return {
        "throughput": throughput(steps=600 if quick else 1500, rounds=1 if quick else 2),
        "reused_worker": reused_worker(jobs=6 if quick else 8),
        "fresh_process": fresh_process(),
        "phases": phases(repeats=3 if quick else 5),
    }


def report(results: dict[str, dict[str, float]]) -> str:
    t, w, f, p = (results[k] for k in ("throughput", "reused_worker", "fresh_process", "phases"))
    joblib = f"joblib, {t['workers']:.0f} workers"
    lines = [
        f"sweep throughput: {t['jobs']:.0f} jobs of {t['steps']:.0f} steps (digits, depth 8, width 64)",
        f"  {'launcher':<22} {'command s':>10} {'sweep s':>9} {'run s':>7}",
        f"  {'basic':<22} {t['basic_s']:10.1f} {t['basic_sweep_s']:9.1f} {t['basic_run_s']:7.2f}",
        f"  {joblib:<22} {t['joblib_s']:10.1f} {t['joblib_sweep_s']:9.1f} {t['joblib_run_s']:7.2f}",
        f"  speedup: {t['speedup']:.2f}x the command, {t['sweep_speedup']:.2f}x the sweep (target >= 1.7x)",
        "fixed cost per job in a reused joblib worker (tiny jobs, train.steps=1)",
        f"  per job {w['per_job_s']:.2f} s (max {w['per_job_max_s']:.2f}; target <= 1.5 s):"
        f" the run {w['in_run_s']:.2f} s, around it {w['around_run_s']:.2f} s",
        f"  a cold worker's first run starts {w['worker_first_run_s']:.1f} s after the parent run",
        "one-time cost of a fresh process",
        f"  python {f['python_s']:.2f} s, import bpexp.train {f['import_train_s']:.2f} s, MLflow client and"
        f" store {f['import_mlflow_store_s']:.2f} s, first torch optimizer {f['first_optimizer_s']:.2f} s",
        "per-job phases in a warm process (medians)",
        f"  compose + validate {p['compose_s']:.3f} s, data + model {p['data_model_s']:.3f} s,"
        f" run creation {p['run_create_s']:.3f} s, train() with 1 step {p['train_total_s']:.3f} s"
        f" (of which run end: tags, artifacts, figure {p['run_end_s']:.3f} s)",
    ]
    return "\n".join(lines)


def break_even(lengths: list[int], jobs: int = 8, workers: int = 2) -> None:
    """The throughput comparison at several run lengths, printed row by row: joblib's workers cost a
    fixed start-up (spawn, imports) and share the cores, so it pays off only once the runs are long."""
    print(f"{jobs} jobs (digits, depth 8, width 64): basic launcher vs joblib with {workers} workers")
    print(f"  {'steps':>6} {'run s':>7} {'basic s':>8} {'joblib s':>9} {'speedup':>8}")
    for steps in lengths:
        t = throughput(jobs=jobs, steps=steps, workers=workers, rounds=1)
        times = f"{t['basic_run_s']:7.2f} {t['basic_s']:8.1f} {t['joblib_s']:9.1f}"
        print(f"  {steps:6d} {times} {t['speedup']:7.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer repeats")
    parser.add_argument(
        "--lengths", default=None, help="only the throughput, at these run lengths in steps (20,400,1500)"
    )
    args = parser.parse_args(argv)
    if args.lengths:
        break_even([int(n) for n in args.lengths.split(",")])
        return
    print(report(measure(args.quick)))


if __name__ == "__main__":
    main()
