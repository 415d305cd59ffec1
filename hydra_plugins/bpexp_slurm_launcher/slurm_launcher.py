"""Hydra's submitit SLURM launcher with three changes that a sweep of many jobs needs:

- it waits for every job before it reads any result: Hydra's reads them in order and raises at the first
  failed one, leaving the sweep to end while the later jobs still run (their runs then end FINISHED in a
  sweep already closed FAILED);
- a job that left no result (scancel, a time limit, a node that died) becomes a FAILED job return, named
  on stderr with its SLURM job id, state and log, instead of an exception that hides the other jobs;
- Ctrl-C or SIGTERM of the launching process cancels the sweep's jobs (scancel), as the joblib launcher
  takes its workers with it; in a job, SIGTERM stops it at once, also outside its run.

It asks SLURM (sacct) for the jobs' states every `state_poll_s` seconds; submitit alone asks once a minute
at most, and learns of a cancelled job only then.

hydra/launcher=batched_slurm (BatchedSlurmLauncher) is the batched launcher whose populations are
submitted through the same executor, one SLURM job each, with the same waiting, naming and cancelling;
in its job, a population's members are created, trained and recorded as the batched launcher does it
on one machine.
"""

# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules, where dataclasses
# cannot resolve string annotations.
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig

from bpexp.lifecycle import sigterm_as_interrupt
from bpexp.names import is_experiment
from hydra_plugins.bpexp_batched_launcher.batched_launcher import BatchedLauncher


@dataclass
class BpexpSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.bpexp_slurm_launcher.slurm_launcher.BpexpSlurmLauncher"
    state_poll_s: float = 10.0  # how often sacct is asked which jobs ended (cancelled, timed out)
    # conf/hydra/launcher/slurm.yaml's values, here too for hydra/launcher=batched_slurm's schema
    signal_delay_s: int = 60
    cpus_per_task: int | None = 1
    mem_gb: int | None = 4
    array_parallelism: int = 64


ConfigStore.instance().store(
    group="hydra/launcher", name="bpexp_slurm", node=BpexpSlurmConf, provider="bpexp"
)


class BpexpSlurmLauncher(SlurmLauncher):
    def __init__(self, state_poll_s: float = 10.0, **params: Any) -> None:
        super().__init__(**params)
        self.state_poll_s = state_poll_s

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        with in_slurm_job():
            return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        submitted = self.submit(job_overrides, initial_job_idx)
        jobs = zip(submitted, job_overrides, strict=True)
        return [job_return(job, list(o), initial_job_idx + i) for i, (job, o) in enumerate(jobs)]

    def submit(
        self,
        job_overrides: Sequence[Sequence[str]],
        initial_job_idx: int,
        task: Callable[..., Any] | None = None,
        arguments: Sequence[Any] = (),
    ) -> list[Any]:
        """The submitted SLURM jobs, once every one has ended: one per job, or in their place one per
        item of `arguments`, each `task(item, Singleton state)`. Hydra's launch builds the executor
        from hydra.launcher and submits through it; Ctrl-C or SIGTERM here scancels them all."""
        import submitit

        submitted: list[Any] = []
        map_array = submitit.AutoExecutor.map_array

        def submit_and_wait(executor: Any, function: Any, *lists: Any) -> list[Any]:
            if task is not None:
                function, lists = task, (list(arguments), [Singleton.get_state()] * len(arguments))
            submitted.extend(map_array(executor, function, *lists))
            self.wait(submitted)
            return [Read()] * len(job_overrides)  # read after, each job once, none raising

        # Hydra's launch builds the executor from hydra.launcher and submits the array through it.
        submitit.AutoExecutor.map_array = submit_and_wait
        try:
            super().launch(job_overrides, initial_job_idx)
        except KeyboardInterrupt:
            for job in submitted:
                job.cancel(check=False)  # scancel: the jobs go with the sweep that launched them
            raise
        finally:
            submitit.AutoExecutor.map_array = map_array
        return submitted

    def wait(self, jobs: list[Any]) -> None:
        """Until every job has a result or SLURM says it ended; a result file is looked for every second."""
        from submitit.slurm.slurm import SlurmJob

        pending, asked = list(jobs), time.monotonic()
        while pending:
            time.sleep(1)
            if time.monotonic() - asked >= self.state_poll_s:
                SlurmJob.watcher.update()
                asked = time.monotonic()
            pending = [job for job in pending if not job.done()]


@contextmanager
def in_slurm_job() -> Iterator[None]:
    """In a job: SIGTERM (scancel) stops it also before and after its run, where submitit would ignore
    it and SLURM would SIGKILL the job KillWait later. SIGUSR2 (time limit near, which SLURM may send
    up to a minute early) matters only inside the run, which then ends KILLED; outside it there is
    nothing to close, and submitit's handler would raise wherever the job happens to be."""
    with sigterm_as_interrupt():
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        yield


class Read:
    """What Hydra's launch reads in place of a job: the jobs' own returns are read after it, each once."""

    def results(self) -> list[None]:
        return [None]


def job_return(job: Any, overrides: list[str], num: int) -> JobReturn:
    """The job's own JobReturn; for a job SLURM ended without one, a FAILED one that says so, also on
    stderr."""
    returned, message = slurm_result(job)
    if message is None:
        return returned
    varied = " ".join(o for o in overrides if is_experiment(o))
    print(f"bpexp: job #{num} {varied}: {message}", file=sys.stderr)
    return failed_return(overrides, message)


def slurm_result(job: Any) -> tuple[Any, str | None]:
    """What the job returned, or None and why SLURM left nothing (scancel, a time limit, a node lost)."""
    state = job.watcher.get_state(job.job_id, mode="cache")
    if job.paths.result_pickle.exists() or state == "COMPLETED":  # (a slow shared disk: results waits)
        try:
            return job.results()[0], None
        except Exception as err:
            return None, f"SLURM job {job.job_id} {state}: {str(err).splitlines()[0]}"
    return None, f"SLURM job {job.job_id} ended {state} without a result (log: {job.paths.stderr})"


def failed_return(overrides: list[str], message: str) -> JobReturn:
    failed = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    failed.return_value = RuntimeError(message)
    return failed


@dataclass
class BatchedSlurmConf(BpexpSlurmConf):
    _target_: str = "hydra_plugins.bpexp_slurm_launcher.slurm_launcher.BatchedSlurmLauncher"
    max_members: int = 4096  # members per population, so per SLURM job, at most (memory)
    device: str = "auto"  # auto: each job's own `device`; cpu or cuda: every population there
    threads: int = 0  # torch threads of a population; 0: the job's cpus_per_task


ConfigStore.instance().store(
    group="hydra/launcher", name="bpexp_batched_slurm", node=BatchedSlurmConf, provider="bpexp"
)


class BatchedSlurmLauncher(BatchedLauncher):
    """hydra/launcher=batched_slurm: the batched launcher's populations, each trained and recorded in
    its own SLURM job, submitted, waited for and cancelled as hydra/launcher=slurm's jobs are."""

    def __init__(self, max_members: int = 4096, device: str = "auto", threads: int = 0, **slurm: Any) -> None:
        super().__init__(max_members, device, threads)
        self.slurm = BpexpSlurmLauncher(**slurm)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.slurm.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def train_populations(self, groups: list[list[Any]], jobs: dict[int, DictConfig]) -> dict[int, JobReturn]:
        if not groups:
            return {}
        populations = [(members, {m.num: jobs[m.num] for m in members}) for members in groups]
        named = [[f"population of jobs {','.join(str(m.num) for m in members)}"] for members in groups]
        submitted = self.slurm.submit(named, 0, task=self.train_in_job, arguments=populations)
        runs: dict[int, JobReturn] = {}
        for job, (members, _) in zip(submitted, populations, strict=True):
            runs.update(population_returns(job, members))
        return runs

    def train_in_job(self, population: tuple[list[Any], dict[int, DictConfig]], singleton_state: Any) -> Any:
        """In the population's SLURM job: its members' runs, in the sweep, then trained and recorded."""
        from bpexp.sweep import launching_in_job

        assert self.hydra_context is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        with in_slurm_job(), launching_in_job(self.hydra_context.callbacks):
            return self.train_population(*population)


def population_returns(job: Any, members: list[Any]) -> dict[int, JobReturn]:
    """Each member's JobReturn from the population's SLURM job; for a job SLURM ended without a result,
    a FAILED one for every member, the population named once on stderr."""
    returned, message = slurm_result(job)
    if message is None:
        return returned
    nums = ", ".join(f"#{m.num}" for m in members)
    print(f"bpexp: population of jobs {nums}: {message}", file=sys.stderr)
    return {m.num: failed_return(m.overrides, message) for m in members}
