"""16 processes log at once: into bpexp-server on PostgreSQL, and into the embedded SQLite store.

    python scripts/bench_store_concurrency.py              # as root, with scripts/cluster.py's packages

Each process opens its own run through bpexp's Tracker (MLflow's client, bpexp's retries and timeouts),
logs BATCHES batches of VALUES metric values, and ends the run. Then every value is counted back from the
store, and every process's errors are listed. One line per store: seconds, values counted / sent,
values per second, errors. The same Python, the same machine, one after the other.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROCESSES = 16
BATCHES = 20  # log_batch calls per process
VALUES = 50  # metric values per call: 5 keys × 10 steps


def log_values(uri: str, experiment: str, i: int, errors) -> None:
    """One process: one run, BATCHES × VALUES values, the run ended FINISHED; an error is reported."""
    from bpexp.tracking import Tracker

    try:
        tracker = Tracker(uri, experiment, timeout=120)
        tracker.start(f"writer{i:02d}", {"writer": i}, {})
        for batch in range(BATCHES):
            for step in range(batch * 10, batch * 10 + 10):
                tracker.log_metrics({f"m/k{k}": float(i * 1e6 + step * 10 + k) for k in range(5)}, step)
            tracker.flush()
        tracker.end("FINISHED")
    except Exception as err:
        errors.put(f"writer {i}: {type(err).__name__}: {err}")


def hammer(uri: str, experiment: str = "concurrency") -> dict:
    """PROCESSES writers at once into `uri`; then every value counted back. Returns the numbers."""
    from mlflow.tracking import MlflowClient

    from bpexp.tracking import Tracker

    Tracker(uri, experiment).experiment_id()  # the store and the experiment exist before the race
    fork = multiprocessing.get_context("fork")
    errors = fork.Queue()
    writers = [fork.Process(target=log_values, args=(uri, experiment, i, errors)) for i in range(PROCESSES)]
    start = time.perf_counter()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    seconds = time.perf_counter() - start
    found = []
    while not errors.empty():
        found.append(errors.get())
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    counted = sum(
        len(client.get_metric_history(run.info.run_id, f"m/k{k}")) for run in runs for k in range(5)
    )
    sent = PROCESSES * BATCHES * VALUES
    return {
        "seconds": seconds,
        "sent": sent,
        "counted": counted,
        "finished": sum(run.info.status == "FINISHED" for run in runs),
        "errors": found + [f"exit code {w.exitcode}" for w in writers if w.exitcode],
    }


def line(name: str, numbers: dict) -> str:
    n = numbers
    return (
        f"{name:<28} {n['seconds']:6.1f} s  {n['counted']}/{n['sent']} values counted back, "
        f"{n['finished']}/{PROCESSES} runs FINISHED, {n['sent'] / n['seconds']:7.0f} values/s, "
        f"{len(n['errors'])} errors {n['errors'][:3]}"
    )


def main() -> int:
    from cluster import Cluster, missing

    print(f"{PROCESSES} processes × {BATCHES} log_batch calls × {VALUES} values, at once")
    with tempfile.TemporaryDirectory() as folder:
        print(line("embedded SQLite store", hammer(f"sqlite:///{folder}/mlflow.db")), flush=True)
    if missing():
        print(f"bpexp-server on PostgreSQL: skipped, missing {', '.join(missing())}")
        return 0
    cluster = Cluster.start()
    try:
        print(line("bpexp-server on PostgreSQL", hammer(cluster.tracking_uri)), flush=True)
    finally:
        cluster.stop(remove=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
