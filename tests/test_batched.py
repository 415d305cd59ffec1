"""The batched launcher end to end: a killed sweep leaves every member KILLED, a population that raises
fails its members and the sweep, and the Optuna sweeper's batches train as populations.

The real CLI, real Hydra multiruns and a real SQLite store; the kill test waits on the store and on the
process (with deadlines), never on a fixed sleep.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bpexp.data import write_idx
from tests.conftest import cli, cli_env, store_runs, until

TINY = ["model.depth=2", "model.width=8", "hydra/launcher=batched"]


def children(store: str, experiment: str = "bpexp") -> list:
    return [r for r in store_runs(store, experiment) if r.data.tags.get("bpexp.role") != "sweep"]


@pytest.mark.slow
def test_sigterm_mid_training_ends_every_member_killed(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    command = cli("-m", *TINY, "train.steps=1000000", "probes.every=1000", "seed=0,1,2")
    command.append(f"hydra.sweep.dir={tmp_path}/sweep")
    sweep = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Created before training, so all three exist while the population trains.
        until(lambda: len(children(store)) == 3, 300, "no member runs in the store", sweep)
        sweep.send_signal(signal.SIGTERM)
        out, err = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode != 0, out[-2000:]
    members = children(store)
    assert len(members) == 3, [r.info.run_name for r in members]
    assert {r.info.status for r in members} == {"KILLED"}, err[-3000:]
    assert {r.data.tags["bpexp.outcome"] for r in members} == {"killed"}
    assert {r.data.tags["bpexp.job"] for r in members} == {"0", "1", "2"}
    assert len({r.data.tags["bpexp.population"] for r in members}) == 1
    # Closed as a lone run closes: tags, config and the probes it had (none if killed before step 0).
    assert all((tmp_path / "sweep" / job / "config.yaml").is_file() for job in ("0", "1", "2"))
    assert all(r.data.params["seed"] == r.data.tags["bpexp.job"] for r in members)


def idx_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(len(images), dtype=np.uint8) % 2)
    return folder


@pytest.mark.slow
def test_a_population_that_raises_fails_its_members_and_the_sweep(tmp_path):
    rng = np.random.default_rng(0)
    good = idx_folder(tmp_path / "good", rng.random((40, 2, 2), dtype=np.float32))
    broken = rng.random((40, 2, 2), dtype=np.float32)
    broken[3, 1, 0] = np.inf
    bad = idx_folder(tmp_path / "bad", broken)
    args = [*TINY, "train.steps=4", "data=idx", "data.n_train=30", "data.n_val=10", "seed=0"]
    command = cli("-m", *args, f"data.path={good},{bad}", f"hydra.sweep.dir={tmp_path}/sweep")
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    members = children(f"sqlite:///{tmp_path}/mlflow.db")
    by_path = {p: [r for r in members if r.data.params.get("data.path") == p] for p in (str(good), str(bad))}
    assert len(members) == 2 and {r.info.status for r in by_path[str(good)]} == {"FINISHED"}
    assert {r.info.status for r in by_path[str(bad)]} == {"FAILED"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run in by_path[str(bad)]:
        traceback = Path(client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path)))
        assert "non-finite" in traceback.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_a_launcher_device_not_on_the_machine_fails_each_job_naming_the_launchers_key(tmp_path):
    args = [*TINY, "train.steps=2", "seed=0,1", "hydra.launcher.device=cuda"]
    command = cli("-m", *args, f"hydra.sweep.dir={tmp_path}/sweep")
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout[-2000:]
    said = "hydra.launcher.device='cuda' is not allowed here: no CUDA device is visible; use auto or cpu"
    lost = [line for line in done.stderr.splitlines() if line.endswith(f"failed (ConfigError: {said})")]
    assert len(lost) == 2, done.stderr[-3000:]


@pytest.mark.slow
def test_optuna_batches_of_n_jobs_trials_train_as_populations(tmp_path):
    optuna = ["hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_jobs=2", "optim=sgd"]
    lrs = "optim.lr=choice(0.01,0.03,0.1,10000.0)"
    command = cli("-m", *TINY, "train.steps=20", *optuna, lrs, f"hydra.sweep.dir={tmp_path}/sweep")
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    members = children(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(members) == 4 and {r.data.tags["bpexp.population_size"] for r in members} == {"2"}
    assert len({r.data.tags["bpexp.population"] for r in members}) == 2  # one per batch of n_jobs trials
    outcomes = {float(r.data.params["optim.lr"]): r.data.tags["bpexp.outcome"] for r in members}
    assert outcomes == {0.01: "completed", 0.03: "completed", 0.1: "completed", 10000.0: "diverged"}
    result = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    best = min(
        (r for r in members if r.data.tags["bpexp.outcome"] == "completed"),
        key=lambda r: r.data.metrics["val/loss"],
    )
    assert result.best_params["optim.lr"] == float(best.data.params["optim.lr"])
    assert result.best_value == pytest.approx(best.data.metrics["val/loss"])


def test_the_launchers_compositions_equal_hydras():
    """Jobs that differ in values only are composed by copying a composed job and setting the values;
    every job's config equals Hydra's own composition, whatever its overrides (groups, presets, `++`,
    lists, `+`), and a value that does not compose fails as in Hydra."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode

    from hydra_plugins.bpexp_batched_launcher.batched_launcher import SweepComposer

    jobs = [
        ["seed=0"],
        ["seed=1"],
        ["experiment=vanishing", "seed=0", "optim.lr=0.1"],
        ["experiment=vanishing", "seed=5", "optim.lr=0.3"],
        ["model.activation=tanh", "seed=2"],
        ["model.activation=relu", "seed=3"],
        ["optim=sgd", "seed=1"],
        ["optim=sgd", "seed=2"],
        ["++train.steps=7", "seed=1"],
        ["++train.steps=9", "seed=4"],
        ["optim.betas=[0.8,0.9]", "seed=1"],
        ["optim.betas=[0.7,0.9]", "seed=1"],
        ["+extra=1", "seed=1"],
        ["+extra=2", "seed=1"],
    ]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", ["hydra/launcher=batched"], run_mode=RunMode.MULTIRUN)
        hydras = loader.load_sweep_config
        composer = SweepComposer(loader)
        for overrides in jobs:
            want = OmegaConf.to_yaml(hydras(master, overrides))
            assert OmegaConf.to_yaml(composer.load_sweep_config(master, overrides)) == want, overrides
        assert len(composer.templates) == 9  # composed by Hydra: the first of each kind
        for bad in (["seed=abc"], ["model.activation=relux"]):
            with pytest.raises(ConfigCompositionException):
                composer.load_sweep_config(master, bad)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_members": 0}, "hydra.launcher.max_members=0 is not allowed: an integer ≥ 1"),
        ({"device": "tpu"}, "hydra.launcher.device='tpu' is not allowed: one of auto, cpu, cuda"),
        ({"threads": -1}, "hydra.launcher.threads=-1 is not allowed: 0 (every core) or ≥ 1"),
    ],
)
def test_a_bad_launcher_setting_names_its_key_and_the_allowed_values(setting, message):
    from hydra_plugins.bpexp_batched_launcher.batched_launcher import BatchedLauncher

    with pytest.raises(ValueError, match=re.escape(message)):
        BatchedLauncher(**setting)
