"""The batched launcher: every job's config loaded as Hydra's BasicLauncher loads it, the jobs grouped
into populations and trained together, then each job run through Hydra's run_job (so the job callbacks,
bpexp.sweep.SweepCallback among them, see every job) to record its member as its own run.

Knows Hydra only: grouping, training and recording are bpexp.batched's.
"""

# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules, where dataclasses
# cannot resolve string annotations.
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
MAX_REMEMBERED = 1024  # composed job configs kept between validation and launch (~0.2 MB each)


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.bpexp_batched_launcher.batched_launcher.BatchedLauncher"
    max_members: int = 4096  # members per population at most (memory); a larger group is cut
    device: str = "auto"  # auto: each job's own `device`; cpu or cuda: every population there


ConfigStore.instance().store(
    group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="bpexp"
)


def remember_compositions(loader: ConfigLoader, composed: dict[tuple[str, ...], DictConfig]) -> None:
    """Keep what the sweeper composes to validate a batch (validate_batch_is_legal, the same loader
    and master config) for the launch that composes the same jobs again: ~0.1 s a job saved. Nothing
    else changes: the loader composes as before, and the launcher takes each config once."""
    load = loader.load_sweep_config
    if getattr(load, "remembers", False):  # a second launcher on the same loader (Optuna's batches)
        load = load.__wrapped__

    def remembering(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        job = load(master_config=master_config, sweep_overrides=sweep_overrides)
        if len(composed) < MAX_REMEMBERED:
            composed[tuple(sweep_overrides)] = job
        return job

    remembering.remembers, remembering.__wrapped__ = True, load  # type: ignore[attr-defined]
    loader.load_sweep_config = remembering  # type: ignore[method-assign]


class BatchedLauncher(Launcher):
    def __init__(self, max_members: int = 4096, device: str = "auto") -> None:
        if max_members < 1:
            raise ValueError(f"hydra.launcher.max_members={max_members!r} is not allowed: an integer ≥ 1")
        if device not in DEVICES:
            raise ValueError(f"hydra.launcher.device={device!r} is not allowed: one of {', '.join(DEVICES)}")
        self.max_members, self.device = max_members, device
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.composed: dict[tuple[str, ...], DictConfig] = {}
        remember_compositions(hydra_context.config_loader, self.composed)

    def job_config(self, overrides: Sequence[str]) -> DictConfig:
        """The job's config as the sweeper composed it to validate the batch, else composed now."""
        job = self.composed.pop(tuple(overrides), None)
        if job is None:
            assert self.config is not None and self.hydra_context is not None
            load = self.hydra_context.config_loader.load_sweep_config
            job = load.__wrapped__(self.config, list(overrides))  # not remembered: taken at once
        return job

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bpexp.batched import Job, populations, prepare

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs as populations (at most {self.max_members} members)")
        launch_dir = Path(self.config.hydra.runtime.cwd)
        jobs = {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job = self.job_config(overrides)
            with open_dict(job):
                job.hydra.job.id = idx
                job.hydra.job.num = idx
            jobs[idx] = job
        cfgs = {idx: cfg for idx, job in jobs.items() if (cfg := prepare(job, launch_dir)) is not None}
        runs = {}
        for idx, job in jobs.items():  # jobs not trained (resumed, bad config) run train.main as alone
            if idx not in cfgs:
                runs[idx] = self.run(self.task_function, job)
        groups = [
            [Job(idx, cfgs[idx], output_dir(jobs[idx]), list(jobs[idx].hydra.overrides.task)) for idx in ids]
            for ids in populations(cfgs, self.max_members)
        ]
        runs.update(self.train_populations(groups, jobs))
        return [runs[idx] for idx in jobs]

    def train_populations(self, groups: list[list[Any]], jobs: dict[int, DictConfig]) -> dict[int, JobReturn]:
        """Each population trained here, one after another (hydra/launcher=batched_slurm: each in its
        own SLURM job)."""
        runs: dict[int, JobReturn] = {}
        for members in groups:
            runs.update(self.train_population(members, {m.num: jobs[m.num] for m in members}))
        return runs

    def train_population(self, members: list[Any], jobs: dict[int, DictConfig]) -> dict[int, JobReturn]:
        """One population (bpexp.batched.Job each) trained, then each member recorded as its job's run."""
        from bpexp.batched import job_task, train_jobs

        assert self.config is not None
        trained = train_jobs(members, Path(self.config.hydra.runtime.cwd), self.device)
        return {m.num: self.run(job_task(trained[m.num]), jobs[m.num]) for m in members}

    def run(self, task: TaskFunction, job: DictConfig) -> JobReturn:
        """One job through Hydra's run_job: its folder, its callbacks (bpexp.sweep's), its return."""
        assert self.config is not None and self.hydra_context is not None
        returned = run_job(
            hydra_context=self.hydra_context,
            task_function=task,
            config=job,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returned


def output_dir(job: DictConfig) -> Path:
    """The job's folder, as run_job will make it (hydra.runtime.output_dir)."""
    return Path(os.path.abspath(os.path.join(str(job.hydra.sweep.dir), str(job.hydra.sweep.subdir))))
