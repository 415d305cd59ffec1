"""What the batched launcher asks of bpexp: job configs into populations, members into lone-looking runs.

The launcher (hydra_plugins/bpexp_batched_launcher) knows Hydra only; population.py knows torch only;
this module joins them to the store. A member's run carries the params, tags, metrics and artifacts of
a lone run (config.yaml, dynamics.parquet), plus `bpexp.population` and `bpexp.population_size`. Its
gradient-profile figure is not drawn: at ~0.2 s a figure, M figures would cost more than training the
population; `python -m bpexp.report` draws a sweep's profiles from the dynamics.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

from bpexp.config import Config, Device, to_config
from bpexp.console import job_line, summary
from bpexp.names import Tag, is_experiment
from bpexp.population import group_key, train_population
from bpexp.probes import Dynamics
from bpexp.recorder import log_history
from bpexp.result import RunResult
from bpexp.theory import Prediction
from bpexp.tracking import make_tracker, sweep_link
from bpexp.train import Run, recorded, resumed, run_name

log = logging.getLogger("bpexp.batched")


@dataclass
class Trained:
    """One member's outcome of population training, waiting to be recorded as its job's run."""

    cfg: Config  # as trained (hydra.launcher.device applied)
    result: RunResult
    dynamics: Dynamics
    prediction: Prediction | None  # theory.py's, logged as a lone run logs it
    population: str
    size: int


def populations(cfgs: dict[int, Config], max_members: int) -> list[list[int]]:
    """Job indices grouped by group_key, in launch order, each group cut to at most max_members."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, cfg in cfgs.items():
        groups[group_key(cfg)].append(index)
    return [ids[i : i + max_members] for ids in groups.values() for i in range(0, len(ids), max_members)]


def train_jobs(
    cfgs: dict[int, Config], max_members: int, device: str = "auto"
) -> dict[int, Trained | Exception]:
    """Train every job as a member of its population; a population that raises fails its members only."""
    outcomes: dict[int, Trained | Exception] = {}
    for ids in populations(cfgs, max_members):
        members = [cfgs[i] for i in ids]
        if device != "auto":
            for cfg in members:
                cfg.device = Device(device)
        population = f"{ids[0]}-{secrets.token_hex(3)}"
        try:
            trained = train_population(members)
        except Exception as err:  # recorded per job as FAILED, with this traceback
            for i in ids:
                outcomes[i] = err
            continue
        for i, (result, dynamics, prediction) in zip(ids, trained, strict=True):
            outcomes[i] = Trained(cfgs[i], result, dynamics, prediction, population, len(ids))
    return outcomes


def prepare(job: DictConfig, launch_dir: Path) -> Config | None:
    """A job's typed config, or None when train.main should run it as it is: sweep.resume found its run
    (train.main skips it), or the config is bad (train.main raises, the sweep records it FAILED)."""
    task = copy.deepcopy(job)
    with read_write(task), open_dict(task):
        del task["hydra"]  # as Hydra's run_job hands the config to the task function
    try:
        cfg = to_config(task)
    except Exception:
        return None
    if cfg.sweep.resume and resumed(cfg, launch_dir) is not None:
        return None
    return cfg


def job_task(trained: Trained | Exception) -> Callable[[DictConfig], float]:
    """The Hydra task function of one member's job: record its run, print its job line, return what
    train.main returns (RunResult.objective). Runs inside run_job, between the job callbacks."""

    def task(job: DictConfig) -> float:
        from hydra.core.hydra_config import HydraConfig

        if isinstance(trained, Exception):
            raise trained
        hydra_cfg = HydraConfig.get()
        cfg, overrides = trained.cfg, list(hydra_cfg.overrides.task)
        if cfg.tracking.run_name is None:  # as train.main names a sweep's runs
            varied = " ".join(o for o in overrides if is_experiment(o))
            cfg.tracking.run_name = f"{varied} · {run_name(cfg)}"[:250] if varied else None
            trained.result.name = run_name(cfg)
        launch_dir, out_dir = Path(hydra_cfg.runtime.cwd), Path(hydra_cfg.runtime.output_dir)
        result = record(cfg, trained, launch_dir, out_dir)
        log.debug(summary(result))  # hydra.verbose=bpexp
        jobs = (sweep_link() or {}).get("jobs")
        print(job_line(result, hydra_cfg.job.num, overrides, jobs), flush=True)
        return result.objective

    return task


def record(cfg: Config, trained: Trained, launch_dir: Path, out_dir: Path) -> RunResult:
    """The member's run, through the lone run's lifecycle (train.recorded): created, filled with its
    probes in one bulk write, tagged and ended; written from this process, its values exist already."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg.tracking, launch_dir, writer=False)
    tags = {Tag.population: trained.population, Tag.population_size: str(trained.size)}
    run = Run(tracker, trained.result, dynamics=trained.dynamics)
    with recorded(cfg, tracker, out_dir, trained.prediction, run, tags):
        history = cfg.tracking.history.value
        log_history(tracker, trained.dynamics.records, history, cfg.tracking.history_every)
    return run.result
