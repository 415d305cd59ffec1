"""The batched launcher: every job's config loaded as Hydra's BasicLauncher loads it, the jobs grouped
into populations and trained together, then each job run through Hydra's run_job (so the job callbacks,
bpexp.sweep.SweepCallback among them, see every job) to record its member as its own run.

Knows Hydra only: grouping, training and recording are bpexp.batched's.
"""

# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules, where dataclasses
# cannot resolve string annotations.
import copy
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
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
MAX_REMEMBERED = 1024  # composed job configs kept, of each kind (~0.2 MB each)


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.bpexp_batched_launcher.batched_launcher.BatchedLauncher"
    max_members: int = 4096  # members per population at most (memory); a larger group is cut
    device: str = "auto"  # auto: each job's own `device`; cpu or cuda: every population there
    threads: int = 0  # torch threads of a population (its members' train.threads); 0: every core it may use


ConfigStore.instance().store(
    group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="bpexp"
)


class SweepComposer:
    """Hydra's load_sweep_config for a sweep's jobs, ~20× faster where jobs differ in values only.

    Jobs whose overrides differ from a job composed before only in plain values of keys that are not
    config groups (seed=3 after seed=2; not a group, a dict or list, `+` or `~`) share its defaults
    list, so their config is that job's, copied, with the values set by Hydra's own override code
    (~5 ms against ~0.1 s a job). Anything else is composed by Hydra. The configs composed to validate a
    batch (the sweeper's validate_batch_is_legal) are kept for the launch that asks for the same jobs."""

    def __init__(self, loader: ConfigLoader) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        load, self.loader = loader.load_sweep_config, loader
        owner = getattr(load, "__self__", None)  # a composer already: a second launcher (Optuna's batches)
        self.compose = owner.compose if isinstance(owner, SweepComposer) else load
        self.parser = OverridesParser.create()
        self.templates: dict[tuple[Any, ...], DictConfig] = {}
        self.remembered: dict[tuple[str, ...], DictConfig] = {}
        self.groups: dict[str, bool] = {}
        loader.load_sweep_config = self.load_sweep_config  # type: ignore[method-assign]

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        job = self.composed(master_config, sweep_overrides)
        if len(self.remembered) < MAX_REMEMBERED:
            self.remembered[tuple(sweep_overrides)] = job
        return job

    def job_config(self, master_config: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """The job's config as composed to validate its batch, else composed now (and not kept)."""
        job = self.remembered.pop(tuple(overrides), None)
        return job if job is not None else self.composed(master_config, list(overrides))

    def is_group(self, key: str) -> bool:
        if key not in self.groups:  # asking Hydra costs ~30 ms
            self.groups[key] = bool(self.loader.get_group_options(key))
        return self.groups[key]

    def composed(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from hydra.core.override_parser.types import OverrideType

        parsed = self.parser.parse_overrides(sweep_overrides)
        free = [
            o.type in (OverrideType.CHANGE, OverrideType.FORCE_ADD)
            and o.package is None
            and not o.is_hydra_override()
            and isinstance(o.value(), str | int | float | bool | type(None))
            and not self.is_group(o.key_or_group)
            for o in parsed
        ]
        kinds = ((o.key_or_group, o.type) if f else o.input_line for o, f in zip(parsed, free, strict=True))
        signature = (id(master_config), *kinds)
        template = self.templates.get(signature)
        if template is None:
            job = self.compose(master_config=master_config, sweep_overrides=sweep_overrides)
            if len(self.templates) < MAX_REMEMBERED:
                self.templates[signature] = copy.deepcopy(job)
            return job
        job = copy.deepcopy(template)
        ConfigLoaderImpl._apply_overrides_to_config([o for o, f in zip(parsed, free, strict=True) if f], job)
        app = [o for o in parsed if not o.is_hydra_override()]
        job.hydra.overrides.task = [o.input_line for o in app]
        naming = job.hydra.job.config.override_dirname
        job.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=naming.kv_sep, item_sep=naming.item_sep, exclude_keys=naming.exclude_keys
        )
        OmegaConf.copy_cache(from_config=master_config, to_config=job)
        return job


class BatchedLauncher(Launcher):
    def __init__(self, max_members: int = 4096, device: str = "auto", threads: int = 0) -> None:
        if max_members < 1:
            raise ValueError(f"hydra.launcher.max_members={max_members!r} is not allowed: an integer ≥ 1")
        if device not in DEVICES:
            raise ValueError(f"hydra.launcher.device={device!r} is not allowed: one of {', '.join(DEVICES)}")
        if threads < 0:
            raise ValueError(f"hydra.launcher.threads={threads!r} is not allowed: 0 (every core) or ≥ 1")
        self.max_members, self.device, self.threads = max_members, device, threads
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.composer = SweepComposer(hydra_context.config_loader)

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
            job = self.composer.job_config(self.config, overrides)
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
        trained = train_jobs(members, Path(self.config.hydra.runtime.cwd), self.device, self.threads)
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
