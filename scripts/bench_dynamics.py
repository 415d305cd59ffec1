"""How long does it take to load a sweep's dynamics into one DataFrame: Parquet artifacts vs MLflow history?

The size of a large sweep: 200 runs × 33 layers × 7 per-layer quantities × 200 probe steps (9.24 M rows).
Synthetic runs are written straight into a temporary SQLite store: each run's `dynamics.parquet` in its
artifact folder, and, for `history_runs` of them, the same numbers logged with MlflowClient.log_batch
(1000 metrics a call, as the tracker does). Logging 46 200 metrics takes MLflow ~10 s per run, so the
metric-history path is measured on that subset and extrapolated linearly to all runs (said so in the
output). Generation time is reported separately and excluded from the load times.

    python scripts/bench_dynamics.py                      # full size, 3 runs for the history path
    python scripts/bench_dynamics.py --quick              # 20 runs × 50 steps, to check that it runs
`benchmark(...)` returns the numbers as a dict (scripts/bench.py calls it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bpexp.store import load_dynamics, load_runs, local_artifact_dir

QUANTITIES = ["grad_norm", "grad_norm_b", "delta_norm", "weight_norm", "update_ratio", "act_mean", "act_std"]
EXPERIMENT = "bench-dynamics"
TARGET_SECONDS = 5.0
TARGET_SPEEDUP = 20.0


def synthetic_dynamics(n_layers: int, n_quantities: int, n_steps: int, rng: np.random.Generator) -> pa.Table:
    """One run's long table (step, layer, quantity, value), step-major as the training loop writes it."""
    quantities = [
        QUANTITIES[i % len(QUANTITIES)] + ("" if i < len(QUANTITIES) else f"_{i}")
        for i in range(n_quantities)
    ]
    steps = np.arange(n_steps, dtype=np.int64) * 10
    per_step = n_layers * n_quantities
    return pa.table(
        {
            "step": np.repeat(steps, per_step),
            "layer": np.tile(np.tile(np.arange(1, n_layers + 1, dtype=np.int64), n_quantities), n_steps),
            "quantity": np.tile(np.repeat(np.array(quantities, dtype=object), n_layers), n_steps),
            "value": 10.0 ** rng.normal(-3, 1, n_steps * per_step),
        }
    )


def make_store(
    root: Path, n_runs: int, n_layers: int, n_quantities: int, n_steps: int, history_runs: int, seed: int = 0
) -> dict[str, Any]:
    """The synthetic sweep: a SQLite store under root, Parquet for every run, metrics for the first
    `history_runs`. Returns the tracking URI, the run ids and the generation times."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    started = time.perf_counter()
    exp_id = client.create_experiment(EXPERIMENT, (root / "mlartifacts").as_uri())
    rng = np.random.default_rng(seed)
    run_ids, parquet_s, history_s = [], 0.0, 0.0
    for i in range(n_runs):
        run = client.create_run(exp_id, run_name=f"synthetic-{i:03d}")
        run_id = run.info.run_id
        run_ids.append(run_id)
        table = synthetic_dynamics(n_layers, n_quantities, n_steps, rng)
        t = time.perf_counter()
        folder = local_artifact_dir(run.info.artifact_uri)
        folder.mkdir(parents=True, exist_ok=True)  # what log_artifact does for a local store: a copy
        pq.write_table(table, folder / "dynamics.parquet")
        parquet_s += time.perf_counter() - t
        if i < history_runs:
            t = time.perf_counter()
            now = int(time.time() * 1000)
            metrics = [
                Metric(f"{q}/l{l:03d}", v, now, s)
                for s, l, q, v in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
            ]
            for j in range(0, len(metrics), 1000):  # MLflow's log_batch limit
                client.log_batch(run_id, metrics=metrics[j : j + 1000])
            history_s += time.perf_counter() - t
        client.set_terminated(run_id)
    return {
        "tracking_uri": uri,
        "run_ids": run_ids,
        "generate_total_s": time.perf_counter() - started,
        "generate_parquet_s": parquet_s,
        "generate_history_s": history_s,
    }


def benchmark(
    n_runs: int = 200,
    n_layers: int = 33,
    n_quantities: int = 7,
    n_steps: int = 200,
    history_runs: int = 3,
    workers: int = 8,
    root: Path | None = None,
) -> dict[str, Any]:
    """Generate the synthetic sweep, load it both ways, return the numbers (seconds, rows, speedup)."""
    history_runs = min(history_runs, n_runs)
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="bpexp-bench-")) if root is None else root
    try:
        store = make_store(root, n_runs, n_layers, n_quantities, n_steps, history_runs)
        uri = store["tracking_uri"]

        t = time.perf_counter()
        runs = load_runs(EXPERIMENT, tracking_uri=uri)
        load_runs_s = time.perf_counter() - t

        times = []
        for _ in range(3):  # the first read also pays for first-touch memory; report it and the best
            t = time.perf_counter()
            parquet = load_dynamics(runs, source="parquet", workers=workers)
            times.append(time.perf_counter() - t)
            rows = len(parquet)
            del parquet
        parquet_s, parquet_best_s = times[0], min(times)

        subset = runs.iloc[:history_runs]
        t = time.perf_counter()
        history = load_dynamics(subset, source="history", workers=workers)
        history_subset_s = time.perf_counter() - t
        t = time.perf_counter()
        parquet_subset = load_dynamics(subset, source="parquet", workers=workers)
        parquet_subset_s = time.perf_counter() - t
        same = len(history) == len(parquet_subset)
        history_s = history_subset_s * n_runs / max(history_runs, 1)
        return {
            "runs": n_runs,
            "layers": n_layers,
            "quantities": n_quantities,
            "steps": n_steps,
            "rows": rows,
            "workers": workers,
            "generate_total_s": store["generate_total_s"],
            "generate_parquet_s": store["generate_parquet_s"],
            "generate_history_s": store["generate_history_s"],
            "load_runs_s": load_runs_s,
            "parquet_s": parquet_s,
            "parquet_best_s": parquet_best_s,
            "parquet_rows_per_s": rows / parquet_s,
            "history_runs_measured": history_runs,
            "history_subset_s": history_subset_s,
            "parquet_subset_s": parquet_subset_s,
            "history_s": history_s,
            "history_extrapolated": history_runs < n_runs,
            "history_rows_match_parquet": same,
            "speedup": history_s / parquet_s,
            "target_met": parquet_s < TARGET_SECONDS and history_s / parquet_s >= TARGET_SPEEDUP,
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def describe(r: dict[str, Any]) -> str:
    runs = f"{r['history_runs_measured']} run" + ("s" if r["history_runs_measured"] != 1 else "")
    how = (
        f"measured on {runs} ({r['history_subset_s']:.2f} s) and extrapolated linearly to {r['runs']}"
        if r["history_extrapolated"]
        else "measured on all runs"
    )
    return "\n".join(
        [
            f"dynamics of {r['runs']} runs × {r['layers']} layers × {r['quantities']} quantities × "
            f"{r['steps']} steps = {r['rows']:,} rows, {r['workers']} threads",
            f"  generation (excluded): {r['generate_total_s']:.1f} s in all; Parquet writes "
            f"{r['generate_parquet_s']:.2f} s; MLflow log_batch for {runs} "
            f"{r['generate_history_s']:.1f} s",
            f"  load_runs (search the store):        {r['load_runs_s']:8.2f} s",
            f"  load_dynamics from Parquet:          {r['parquet_s']:8.2f} s  "
            f"({r['parquet_rows_per_s'] / 1e6:.1f} M rows/s; best of 3: {r['parquet_best_s']:.2f} s)",
            f"  load_dynamics from metric history:   {r['history_s']:8.1f} s  ({how})",
            f"  Parquet is {r['speedup']:.0f}× faster; same rows on the measured runs: "
            f"{r['history_rows_match_parquet']}; target (< {TARGET_SECONDS:g} s and ≥ {TARGET_SPEEDUP:g}×) "
            f"{'met' if r['target_met'] else 'NOT met'}",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--quantities", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--history-runs", type=int, default=3, help="runs measured on the metric-history path"
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--quick", action="store_true", help="20 runs × 50 steps, to check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.history_runs = 20, 50, 1
    result = benchmark(args.runs, args.layers, args.quantities, args.steps, args.history_runs, args.workers)
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return result


if __name__ == "__main__":
    main()
