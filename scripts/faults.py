"""Run the table of faults a user can hit and print what each one leads to (docs/reliability.md).

    python scripts/faults.py            # every fault, each in a fresh temporary folder, about 3 minutes

Each fault goes through the real CLI (`python -m bpexp.train`, tiny net, 2 steps) against a real SQLite
store, or a fake server of a few lines (an API that answers 500, or one that never answers). The line
printed per fault: exit status, seconds, and the message the user reads (or the state of the store).
The lost-server case needs a real `mlflow server`: tests/test_faults.py covers it.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpexp.data import write_idx  # noqa: E402
from tests.test_faults import start_fake_server  # noqa: E402

SMALL = ["train.steps=2", "probes.every=1", "model.depth=2", "model.width=8"]


def train(folder: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "bpexp.train", *SMALL, f"hydra.run.dir={folder}/o", *args]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fake_server(hang: bool) -> str:
    """/health answers; the API answers 500, or never (the same fake server as the tests')."""
    hanging = threading.Event()
    if hang:
        hanging.set()
    server = start_fake_server(hanging, threading.Event())
    return f"http://127.0.0.1:{server.server_address[1]}"


def store_runs(folder: Path) -> str:
    """What the store holds after the fault: runs by status and outcome."""
    path = folder / "mlflow.db"
    if not path.exists():
        return "no store"
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "select status, coalesce((select value from tags t where t.run_uuid = r.run_uuid "
            "and key = 'bpexp.outcome'), '') from runs r"
        ).fetchall()
    counts: dict[str, int] = {}
    for status, outcome in rows:
        counts[f"{status}/{outcome}"] = counts.get(f"{status}/{outcome}", 0) + 1
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items())) or "no runs"


# Each fault: set up `folder`, start the processes, and say where to look for the outcome.
def concurrent_first_use(folder: Path) -> list[subprocess.Popen]:
    return [
        train(folder / f"j{seed}", f"seed={seed}", f"tracking.uri=sqlite:///{folder}/mlflow.db")
        for seed in range(4)
    ]


def unwritable_folder(folder: Path) -> list[subprocess.Popen]:
    return [train(folder, "tracking.uri=sqlite:////sys/mlflow.db")]  # /sys refuses even root


def foreign_sqlite(folder: Path) -> list[subprocess.Popen]:
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("create table notes(x)")
    return [train(folder)]


def corrupt_store(folder: Path) -> list[subprocess.Popen]:
    (folder / "mlflow.db").write_bytes(b"not a database " * 100)
    return [train(folder)]


def artifacts_fail(folder: Path) -> list[subprocess.Popen]:
    (folder / "o").mkdir()
    (folder / "o" / "plots").write_text("a file where the figures go")
    return [train(folder)]


def idx_inf(folder: Path) -> list[subprocess.Popen]:
    images = np.zeros((10, 2, 2), dtype=np.float32)
    images[3, 1, 0] = np.inf
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8) % 2)
    return [train(folder, "data=idx", f"data.path={folder}")]


def idx_short(folder: Path) -> list[subprocess.Popen]:
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    (folder / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    return [train(folder, "data=idx", f"data.path={folder}")]


def sweep(folder: Path, *args: str, sweep_dir: str = "multirun") -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "bpexp.train",
        "-m",
        *SMALL,
        f'hydra.sweep.dir="{folder}/{sweep_dir}"',
        *args,
    ]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sigterm(folder: Path) -> list[subprocess.Popen]:
    """SIGTERM once the run exists (its first progress line), as a scheduler sends it."""
    process = train(folder, "train.steps=10000000", "data=gaussian", "hydra.verbose=bpexp.train")
    for line in process.stdout:  # hydra.verbose logs to stdout
        if "started (" in line:
            break
    process.send_signal(signal.SIGTERM)
    return [process]


def killed_launcher(folder: Path) -> list[subprocess.Popen]:
    """kill -9 of a joblib launcher once its first job line is out; then the report, which closes it."""
    launcher = sweep(
        folder, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2,3", "train.steps=3000"
    )
    for line in launcher.stdout:
        if line.startswith("[1/4]"):
            break
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 60  # the workers stop their runs (KILLED) and exit
    while time.monotonic() < deadline and "RUNNING/running" in store_runs(folder):
        time.sleep(0.5)
    report = [sys.executable, "-m", "bpexp.report", "--out-dir", str(folder / "reports")]
    return [subprocess.Popen(report, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]


def quoted_sweep_folder(folder: Path) -> list[subprocess.Popen]:
    (folder / "it's" / "1").mkdir(parents=True)
    (folder / "it's" / "1" / "plots").write_text("a file where the figures go")  # job 1's run fails
    return [sweep(folder, "seed=0,1", sweep_dir="it's")]


FAULTS: list[tuple[str, Callable[[Path], list[subprocess.Popen]]]] = [
    ("4 runs start together on a new store", concurrent_first_use),
    ("server API answers 500", lambda f: [train(f, f"tracking.uri={fake_server(False)}")]),
    ("server API never answers", lambda f: [train(f, f"tracking.uri={fake_server(True)}")]),
    ("store folder not writable", unwritable_folder),
    ("store is another program's SQLite file", foreign_sqlite),
    ("store file is corrupt", corrupt_store),
    ("artifacts cannot be saved", artifacts_fail),
    ("IDX images hold an inf", idx_inf),
    ("IDX header cut to 6 bytes", idx_short),
    ("optim.lr=inf", lambda f: [train(f, "optim.lr=inf")]),
    ("data.noise=inf", lambda f: [train(f, "data.noise=inf")]),
    ("tracking.experiment=..", lambda f: [train(f, "tracking.experiment=..")]),
    ("SIGTERM of a single run", sigterm),
    ("sweep value that does not compose", lambda f: [sweep(f, "model.activation=relu,relux")]),
    ("quote in the sweep folder, a job fails", quoted_sweep_folder),
    ("kill -9 of a joblib launcher, then report", killed_launcher),
]


def main() -> None:
    print(f"{'fault':40} {'exit':>6} {'s':>5}  what the user sees")
    for name, setup in FAULTS:
        with tempfile.TemporaryDirectory(prefix="bpexp-fault-") as tmp:
            folder = Path(tmp)
            for sub in ("j0", "j1", "j2", "j3"):
                (folder / sub).mkdir()
            start = time.perf_counter()
            processes = setup(folder)
            errors = [process.communicate(timeout=600)[1] for process in processes]
            seconds = time.perf_counter() - start
            codes = ",".join(str(process.returncode) for process in processes)
            said = [line for err in errors for line in err.splitlines() if line.startswith("bpexp:")]
            tracebacks = sum("Traceback" in err for err in errors)
            seen = said[0][:150] if said else f"store: {store_runs(folder)}"
            if (folder / "mlartifacts").exists():
                inside = sorted(path.name for path in (folder / "mlartifacts").iterdir())
                seen += f"; mlartifacts/ holds {inside}"
            if tracebacks:
                seen += f" ({tracebacks} traceback{'s' if tracebacks > 1 else ''})"
            print(f"{name:40} {codes:>6} {seconds:5.1f}  {seen}", flush=True)


if __name__ == "__main__":
    main()
