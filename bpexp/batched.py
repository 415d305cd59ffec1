"""What the batched launcher asks of bpexp: job configs into populations, members into lone-looking runs.

The launcher (hydra_plugins/bpexp_batched_launcher) knows Hydra only; population.py knows torch only;
this module joins them to the store. A member's run carries the params, tags, metrics and artifacts of
a lone run (config.yaml, dynamics.parquet), plus `bpexp.population` and `bpexp.population_size`. Its
gradient-profile figure is not drawn: at ~0.2 s a figure, M figures would cost more than training the
population; `python -m bpexp.report` draws a sweep's profiles from the dynamics.

A member's run is created, RUNNING, before its population trains, as a lone run is before its loop (all
of a population's runs in one transaction where the store is SQLite, sqlstore.py, then written there
straight to their end; through MLflow's client elsewhere): a
SIGTERM during training ends every member KILLED with the probes it had, and a population that raises
ends each member FAILED with the traceback; the job then fails, and the sweep exits 1.
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

from bpexp.config import Config, Device, to_config
from bpexp.console import job_line, summary
from bpexp.lifecycle import kill_reason
from bpexp.names import Outcome, Tag
from bpexp.population import Member, Population, group_key
from bpexp.probes import Dynamics
from bpexp.recorder import log_history
from bpexp.result import RunResult
from bpexp.sqlstore import start_runs
from bpexp.sweep import launching_link
from bpexp.theory import Prediction
from bpexp.tracking import NullTracker, Tracker, make_tracker, resolve_uri, sweep_link
from bpexp.train import Run, finish, name_in_sweep, recorded, resolve_device, resumed, run_name, run_start

log = logging.getLogger("bpexp.batched")


@dataclass
class Job:
    """A sweep's job as the launcher hands it over: its number, typed config, folder and overrides."""

    num: int
    cfg: Config
    out_dir: Path
    overrides: list[str]


@dataclass
class Trained:
    """One member's outcome of population training, waiting to be recorded as its job's run."""

    cfg: Config  # as trained (hydra.launcher.device applied, the run named as in a sweep)
    result: RunResult
    dynamics: Dynamics
    prediction: Prediction | None  # theory.py's, logged as a lone run logs it
    tracker: NullTracker  # the run, created before training
    tags: dict[str, str]  # bpexp.population, bpexp.population_size
    error: Exception | None = None  # the population raised: the run ends FAILED with its traceback


def populations(cfgs: dict[int, Config], max_members: int) -> list[list[int]]:
    """Job indices grouped by group_key, in launch order, each group cut to at most max_members."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, cfg in cfgs.items():
        groups[group_key(cfg)].append(index)
    return [ids[i : i + max_members] for ids in groups.values() for i in range(0, len(ids), max_members)]


def train_jobs(
    jobs: list[Job], launch_dir: Path, device: str = "auto", threads: int = 0
) -> dict[int, Trained | Exception]:
    """Train one population's jobs; their runs exist from before training to the end, whatever happens.
    An exception before the runs exist is each job's to raise (bpexp.sweep records it FAILED).

    The population is the process's one computation, so it takes `threads` torch threads, by default
    every core the process may use: its members' train.threads say so in their runs."""
    tags = {Tag.population: f"{jobs[0].num}-{secrets.token_hex(3)}", Tag.population_size: str(len(jobs))}
    for job in jobs:
        name_in_sweep(job.cfg, job.overrides)
        if device != "auto":
            job.cfg.device = Device(device)
        job.cfg.train.threads = threads or usable_cores()
    try:
        resolve_device(Device(device), key="hydra.launcher.device")  # checked where the population trains
        population = Population([job.cfg for job in jobs])
        trackers = open_runs(jobs, population.members, launch_dir, tags)
    except Exception as err:
        return {job.num: err for job in jobs}
    error = None
    try:
        population.train()
    except KeyboardInterrupt as interrupt:  # SIGTERM (bpexp.sweep's hooks, a SLURM job's) or Ctrl-C:
        for job, member, tracker in zip(jobs, population.members, trackers, strict=True):
            end_killed(job, member, tracker, kill_reason(interrupt))  # every member KILLED, then unwind
        raise
    except Exception as err:  # recorded per member as FAILED, with this traceback
        error = err
    return {
        job.num: Trained(job.cfg, member.result, member.dynamics, member.prediction, tracker, tags, error)
        for job, member, tracker in zip(jobs, population.members, trackers, strict=True)
    }


def usable_cores() -> int:
    """The cores this process may run on: a SLURM job's cpus_per_task, else its CPU affinity."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))


def open_runs(
    jobs: list[Job], members: list[Member], launch_dir: Path, tags: dict[str, str]
) -> list[NullTracker]:
    """The members' runs, created as lone runs create theirs (train.run_start), each in its sweep as its
    job: through one MLflow client, and in one transaction where the store allows (sqlstore.py)."""
    trackers: list[NullTracker] = []
    clients: dict[str, Any] = {}  # by store: opening a client costs ~50 ms
    for job in jobs:
        link = launching_link(job.num, str(job.out_dir))
        uri = link["uri"] if link else resolve_uri(job.cfg.tracking, launch_dir)
        tracker = make_tracker(job.cfg.tracking, launch_dir, writer=False, link=link, client=clients.get(uri))
        if isinstance(tracker, Tracker):
            clients.setdefault(tracker.uri, tracker.client)
        trackers.append(tracker)
    starts = [
        run_start(job.cfg, run_name(job.cfg), member.prediction, tags)
        for job, member in zip(jobs, members, strict=True)
    ]
    return start_runs(trackers, starts)


def end_killed(job: Job, member: Member, tracker: NullTracker, reason: str) -> None:
    """A member interrupted mid-training: its probes so far, its tags and config, KILLED with the
    reason (as a lone run)."""
    try:
        member.result.outcome, member.result.out_dir = Outcome.killed, job.out_dir
        tracker.set_tags({Tag.killed_by: reason})
        job.out_dir.mkdir(parents=True, exist_ok=True)
        write_history(job.cfg, tracker, member.dynamics)
        finish(job.cfg, Run(tracker, member.result, dynamics=member.dynamics), figure=False)
    except Exception as err:  # the sweep's end closes what is left RUNNING as KILLED
        log.warning("member %s of a killed population not closed: %s", job.num, err)


def write_history(cfg: Config, tracker: NullTracker, dynamics: Dynamics) -> None:
    """The member's probes into its run as the writer would have sent them (none for tracking=none)."""
    if isinstance(tracker, Tracker):
        log_history(tracker, dynamics.records, cfg.tracking.history.value, cfg.tracking.history_every)


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
        out_dir = Path(hydra_cfg.runtime.output_dir)
        result = record(trained, out_dir)
        log.debug(summary(result))  # hydra.verbose=bpexp
        jobs = (sweep_link() or {}).get("jobs")
        print(job_line(result, hydra_cfg.job.num, list(hydra_cfg.overrides.task), jobs), flush=True)
        return result.objective

    return task


def record(trained: Trained, out_dir: Path) -> RunResult:
    """The member's run, through the lone run's lifecycle (train.recorded): filled with its probes in
    one bulk write, tagged and ended; written from this process, its values exist already."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, tracker = trained.cfg, trained.tracker
    run = Run(tracker, trained.result, dynamics=trained.dynamics)
    with recorded(cfg, tracker, out_dir, trained.prediction, run, trained.tags):
        write_history(cfg, tracker, trained.dynamics)
        if trained.error is not None:
            raise trained.error
    return run.result
