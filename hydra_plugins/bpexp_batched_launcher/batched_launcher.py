"""The batched launcher: every job's config loaded as Hydra's BasicLauncher loads it, the jobs grouped
into populations and trained together, then each job run through Hydra's run_job (so the job callbacks,
bpexp.sweep.SweepCallback among them, see every job) to record its member as its own run.

Knows Hydra only: grouping, training and recording are bpexp.batched's.
"""

# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules, where dataclasses
# cannot resolve string annotations.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.bpexp_batched_launcher.batched_launcher.BatchedLauncher"
    max_members: int = 4096  # members per population at most (memory); a larger group is cut
    device: str = "auto"  # auto: each job's own `device`; cpu or cuda: every population there


ConfigStore.instance().store(
    group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="bpexp"
)


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

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bpexp.batched import job_task, prepare, train_jobs

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs as populations (at most {self.max_members} members)")
        launch_dir = Path(self.config.hydra.runtime.cwd)
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job):
                job.hydra.job.id = idx
                job.hydra.job.num = idx
            jobs.append((idx, job))
        cfgs = {idx: cfg for idx, job in jobs if (cfg := prepare(job, launch_dir)) is not None}
        trained = train_jobs(cfgs, self.max_members, self.device)
        runs = []
        for idx, job in jobs:  # jobs not trained (resumed, bad config) run train.main as they would alone
            task = job_task(trained[idx]) if idx in trained else self.task_function
            runs.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=task,
                    config=job,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
