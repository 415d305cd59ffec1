"""What the harness costs, measured side by side in one process (this machine is noisy: compare ratios).

    python scripts/bench.py                 # the full table (a few minutes on 2 cores)
    python scripts/bench.py --quick         # smaller sizes, to check that it runs
    python scripts/bench.py --instruments   # only what the instruments cost (noise, sharpness, Jacobian)
    python scripts/bench.py --overhead      # only the overhead table

For each MLP size the same data, model and steps run as: the bare PyTorch loop (the floor), the harness
with default settings (probes every 10 steps, MLflow logging into a SQLite store), and the harness
probing every step. Variants alternate within each repetition and the median is reported. Start-up
(imports, store, run creation) and teardown (artifacts) are reported separately as the fixed cost of
a run. It also times the hand-written backward (train.engine=manual) against autograd, and the write
path (bpexp/recorder.py): metric values per second into the SQLite store through the writer process,
one run and four at once, with MLflow's log_batch beside it; the end-of-run drain; the time from the
command to the first training step.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from bpexp.config import Config, Loss, to_config
from bpexp.data import make_data
from bpexp.model import build_mlp
from bpexp.optim import build_optimizer
from bpexp.probes import Instruments
from bpexp.recorder import ClientMetrics, RecordingTracker
from bpexp.tracking import Tracker
from bpexp.train import minibatches, train

CONF = Path(__file__).resolve().parents[1] / "conf"


def config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("train", overrides=list(overrides)))


def bare_loop(cfg: Config) -> float:
    """The floor: the same model, data, batches and optimizer, with nothing measured or logged."""
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    data = make_data(cfg.data, cfg.seed).to(torch.device("cpu"), torch.float32)
    model = build_mlp(cfg.model, data.in_dim, data.out_dim)
    optimizer, schedule = build_optimizer(cfg.optim, model.parameters(), cfg.train.steps)
    batches = minibatches(data, cfg.train.batch_size, cfg.seed)
    start = time.perf_counter()
    for _ in range(cfg.train.steps):
        x, y = next(batches)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def harness(cfg: Config, folder: Path) -> tuple[float, float]:
    """(loop seconds, whole-run seconds) of train() into a fresh SQLite store."""
    cfg.tracking.uri = f"sqlite:///{folder}/mlflow.db"
    result = train(cfg, launch_dir=folder, out_dir=folder / "out")
    return result.loop_seconds, result.seconds


VARIANTS = {  # name -> overrides; "store" variants log into a fresh SQLite store
    "probes": ["tracking=none"],
    "default": [],
    "no noise": ["tracking=none", "probes=full", "probes.noise=false"],
    "full probes": ["tracking=none", "probes=full"],
    "full+store": ["probes=full"],
}


def overhead_table(sizes: list[tuple[int, int]], steps: int, repeats: int) -> list[dict]:
    """Loop time of each variant as a ratio to the bare loop (median over alternating repetitions)."""
    rows = []
    for depth, width in sizes:
        common = [f"model.depth={depth}", f"model.width={width}", f"train.steps={steps}", "data=teacher"]
        times: dict[str, list[float]] = {"bare": [], **{name: [] for name in VARIANTS}}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                # the store exists before timing, as it does for every run after a user's first
                Tracker(f"sqlite:///{tmp}/mlflow.db", "bpexp").experiment_id()
                times["bare"].append(bare_loop(config(*common)))
                for i, (name, overrides) in enumerate(VARIANTS.items()):
                    times[name].append(harness(config(*common, *overrides), Path(tmp) / str(i))[0])
        median = {name: statistics.median(values) for name, values in times.items()}
        row = {"depth": depth, "width": width, "steps": steps, "bare_s": median["bare"]}
        row.update({name: median[name] / median["bare"] for name in VARIANTS})
        rows.append(row)
    return rows


def fixed_costs() -> dict[str, float]:
    """Imports (a fresh interpreter), store creation, run creation, and teardown of one small run."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bpexp.train"], check=True)
    imports = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bpexp")
        tracker.experiment_id()
        new_store = time.perf_counter() - start
        start = time.perf_counter()
        tracker.start("bench", {"a": 1}, {})
        run = time.perf_counter() - start
        tracker.end("FINISHED")
        result = train(
            config("train.steps=20", f"tracking.uri=sqlite:///{tmp}/mlflow.db"), Path(tmp), Path(tmp) / "o"
        )
        teardown = result.seconds - result.loop_seconds
    return {
        "imports_s": imports,
        "new_store_s": new_store,
        "run_creation_s": run,
        "run_start_and_end_s": teardown,
    }


def recorded(folder: Path, runs: int, probes: int, keys: int) -> float:
    """Values per second and per run through `runs` writer processes at once (start-up not counted)."""
    folder.mkdir()
    store = f"sqlite:///{folder}/mlflow.db"
    Tracker(store, "bpexp").experiment_id()
    trackers = [RecordingTracker(store, "bpexp") for _ in range(runs)]
    for i, tracker in enumerate(trackers):
        tracker.start(f"bench{i}", {}, {})
    for tracker in trackers:
        assert tracker.run_id is not None  # the writers are up: what follows is the write path alone
    start = time.perf_counter()
    for step in range(probes):
        for tracker in trackers:
            tracker.log_metrics({f"q/l{k:03d}": step + k for k in range(keys)}, step)
    for tracker in trackers:
        tracker.end("FINISHED")
    return probes * keys / (time.perf_counter() - start)


def log_batch_rate(folder: Path, values: int) -> float:
    """Values per second through MLflow's own log_batch (1000 per call), one run, in this process."""
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db", "bpexp")
    tracker.start("log_batch", {}, {})
    rows = [(f"q/l{i % 330:03d}", float(i), 0, i // 330) for i in range(values)]
    start = time.perf_counter()
    ClientMetrics(tracker.client, tracker.run_id).write(rows)  # type: ignore[arg-type]
    rate = values / (time.perf_counter() - start)
    tracker.end("FINISHED")
    return rate


def write_path(quick: bool) -> dict[str, float]:
    """Store throughput (one run, four at once, log_batch), drain of a default run, command to first step."""
    probes = 300 if quick else 1500  # probe steps of a 32-layer net: 330 values each
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["one run, values/s"] = recorded(Path(tmp) / "1", 1, probes, 330)
        out["four runs, values/s per run"] = recorded(Path(tmp) / "4", 4, probes // 2, 330)
        out["log_batch, values/s"] = log_batch_rate(Path(tmp) / "1", 10_000 if quick else 30_000)
        drains = []
        end = RecordingTracker.end

        def timed_end(self: RecordingTracker, status: str) -> None:
            end(self, status)
            drains.append(self.drain_seconds)

        RecordingTracker.end = timed_end  # type: ignore[method-assign]
        try:
            for _ in range(3):
                train(config(f"tracking.uri=sqlite:///{tmp}/1/mlflow.db"), Path(tmp), Path(tmp) / "o")
        finally:
            RecordingTracker.end = end  # type: ignore[method-assign]
        out["drain of a default run, s"] = statistics.median(drains)
        out["command to first step, s"] = statistics.median(first_step(Path(tmp)) for _ in range(3))
    return out


def first_step(folder: Path) -> float:
    """Seconds from `python -m bpexp.train` to its log line just before the loop (an existing store)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "bpexp.train", f"tracking.uri=sqlite:///{folder}/1/mlflow.db"]
    command += [f"hydra.run.dir={folder}/cli", "hydra.verbose=bpexp.train"]  # the debug line "… started (…)"
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            if " started (" in line:
                seconds = time.perf_counter() - start
        proc.wait()
    return seconds


def engine_ratio(steps: int, repeats: int) -> list[dict]:
    """Step time of the hand-written backward as a ratio to autograd's on the same MLP (probes off)."""
    rows = []
    for depth, width in [(8, 64), (8, 256)]:
        common = [f"model.depth={depth}", f"model.width={width}", f"train.steps={steps}", "tracking=none",
                  "probes=off", "data=teacher", "model.activation=tanh"]  # fmt: skip
        times: dict[str, list[float]] = {"autograd": [], "manual": []}
        for _ in range(repeats):
            for engine in times:
                times[engine].append(train(config(*common, f"train.engine={engine}")).loop_seconds)
        auto, manual = statistics.median(times["autograd"]), statistics.median(times["manual"])
        rows.append(
            {"depth": depth, "width": width, "autograd_ms": 1e3 * auto / steps, "manual_x": manual / auto}
        )
    return rows


INSTRUMENTS = {  # name -> (size, overrides against the default run of that size, the target)
    "noise on every probe step": ((4, 64), ["probes.noise=true"], 1.15),
    "noise, 8 x 64": ((8, 64), ["probes.noise=true"], 1.15),
    "sharpness every 50 steps, 20 HVPs": (
        (8, 64),
        ["probes.sharpness_every=50", "probes.sharpness_iters=20"],
        1.3,
    ),
}


def instruments_table(steps: int, repeats: int) -> list[dict]:
    """Loop time with each instrument on, as a ratio to the default run of the same size (probes every 10
    steps, tracking=none so the store's noise stays out), median over alternating repetitions; the
    Jacobian spectrum is timed apart (jacobian_cost): inside a run its cost is below this machine's noise."""
    rows = []
    for name, ((depth, width), overrides, target) in INSTRUMENTS.items():
        common = [f"model.depth={depth}", f"model.width={width}", f"train.steps={steps}", "tracking=none"]
        times: dict[str, list[float]] = {"base": [], "with": []}
        for _ in range(repeats):
            times["base"].append(train(config(*common)).loop_seconds)
            times["with"].append(train(config(*common, *overrides)).loop_seconds)
        base_s, with_s = statistics.median(times["base"]), statistics.median(times["with"])
        rows.append({"name": name, "size": f"{depth} x {width}", "base_s": base_s, "with_s": with_s,
                     "ratio": with_s / base_s, "target": target})  # fmt: skip
    return rows


def jacobian_cost(repeats: int) -> list[dict]:
    """The Jacobian spectrum (probes.Instruments.jacobian: 8 inputs, float64) at depth 32 × width 256, in
    seconds and in training steps (batch 128, Adam, float32) of the same net; digits (n_0 = 64) and a square
    net (n_0 = 256, J is 256 × 256)."""
    rows = []
    for data in (["data=digits"], ["data=gaussian", "data.in_dim=256"]):
        cfg = config("model.depth=32", "model.width=256", "tracking=none", *data)
        torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        dataset = make_data(cfg.data, cfg.seed).to(torch.device("cpu"), torch.float32)
        model = build_mlp(cfg.model, dataset.in_dim, dataset.out_dim)
        optimizer, _ = build_optimizer(cfg.optim, model.parameters(), cfg.train.steps)
        x, y = dataset.x_train[:128], dataset.y_train[:128]
        loss = F.cross_entropy if dataset.classification else F.mse_loss
        extra = Instruments(model, cfg.probes, Loss.auto, dataset.x_train, cfg.seed)

        def step() -> None:
            loss(model(x), y).backward()  # noqa: B023 - timed right here
            optimizer.step()  # noqa: B023
            optimizer.zero_grad(set_to_none=True)  # noqa: B023

        times: dict[str, list[float]] = {"jacobian": [], "step": []}
        for _ in range(repeats):
            for name, fn in (("jacobian", lambda: extra.jacobian(1)), ("step", step)):  # noqa: B023
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        jac, one = statistics.median(times["jacobian"]), statistics.median(times["step"])
        rows.append({"n0": dataset.in_dim, "jacobian_s": jac, "steps": jac / one})
    return rows


def print_instruments(steps: int, repeats: int) -> None:
    print(f"\ninstruments: loop time / the default run of the same size ({steps} steps, no store), "
          f"median of {repeats} alternating runs")  # fmt: skip
    for r in instruments_table(steps, repeats):
        target = f"target <= {r['target']:.2f}x"
        print(f"  {r['name']:<36} {r['size']:>8}: {r['base_s']:6.2f} s -> {r['with_s']:6.2f} s, "
              f"{r['ratio']:5.2f}x  ({target})")  # fmt: skip
    for r in jacobian_cost(max(repeats, 5)):
        print(f"  Jacobian spectrum at init, 32 x 256, n_0 = {r['n0']:3d}: {r['jacobian_s']:.3f} s "
              f"= {r['steps']:.0f} training steps")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps")
    parser.add_argument("--instruments", action="store_true", help="only the instruments' table")
    parser.add_argument("--overhead", action="store_true", help="only the overhead table")
    args = parser.parse_args()
    sizes = [(8, 64), (8, 256), (32, 64), (32, 256)]
    steps, repeats = (60, 2) if args.quick else (300, 3)
    if args.instruments:
        print_instruments(steps, 5 if not args.quick else repeats)
        return
    if args.quick:
        sizes = sizes[:2]

    print(f"overhead of the harness: loop time / bare PyTorch loop, median of {repeats} alternating runs")
    print("  probes: default probes (every 10 steps), no store; default: the same logged to MLflow (SQLite)")
    print("  full probes: every quantity every step (probes=full), no store; full+store: the same logged to")
    print("  MLflow; no noise: full probes without the per-example gradient noise (probes.noise=false)")
    print(
        f"{'depth':>5} {'width':>5} {'steps':>5} {'bare s':>7}" + "".join(f" {name:>11}" for name in VARIANTS)
    )
    for r in overhead_table(sizes, steps, repeats):
        ratios = "".join(f" {r[name]:10.2f}x" for name in VARIANTS)
        print(f"{r['depth']:5d} {r['width']:5d} {r['steps']:5d} {r['bare_s']:7.2f}{ratios}")
    print("targets: default <= 1.10x, every step with all quantities <= 1.50x\n")
    if args.overhead:
        return

    print("fixed cost of one run (not in the ratios above)")
    for key, value in fixed_costs().items():
        print(f"  {key:<22} {value:6.2f} s")

    print("\nhand-written backward (train.engine=manual) vs autograd, probes off")
    for r in engine_ratio(steps, repeats):
        print(
            f"  depth {r['depth']:2d} width {r['width']:3d}: "
            f"autograd {r['autograd_ms']:.2f} ms/step, manual {r['manual_x']:.2f}x"
        )
    print("target: manual <= 1.5x")

    print("\nthe write path (bpexp/recorder.py), SQLite store")
    for key, value in write_path(args.quick).items():
        print(f"  {key:<30} {value:10.3f}" if value < 100 else f"  {key:<30} {value:10.0f}")
    print(
        "targets: >= 50000 values/s one run, >= 20000 per run four at once, drain <= 0.3 s, first step <= 3 s"
    )
    print_instruments(steps, repeats)


if __name__ == "__main__":
    main()
