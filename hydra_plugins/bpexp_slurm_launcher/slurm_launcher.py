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
"""

# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules, where dataclasses
# cannot resolve string annotations.
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from bpexp.lifecycle import sigterm_as_interrupt
from bpexp.names import is_experiment


@dataclass
class BpexpSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.bpexp_slurm_launcher.slurm_launcher.BpexpSlurmLauncher"
    state_poll_s: float = 10.0  # how often sacct is asked which jobs ended (cancelled, timed out)


ConfigStore.instance().store(
    group="hydra/launcher", name="bpexp_slurm", node=BpexpSlurmConf, provider="bpexp"
)


class BpexpSlurmLauncher(SlurmLauncher):
    def __init__(self, state_poll_s: float = 10.0, **params: Any) -> None:
        super().__init__(**params)
        self.state_poll_s = state_poll_s

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """In the job: SIGTERM (scancel) stops it also before and after its run, where submitit would
        ignore it and SLURM would SIGKILL the job KillWait later. SIGUSR2 (time limit near, which SLURM
        may send up to a minute early) matters only inside the run, which then ends KILLED; outside it
        there is nothing to close, and submitit's handler would raise wherever the job happens to be."""
        with sigterm_as_interrupt():
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        submitted: list[Any] = []
        map_array = submitit.AutoExecutor.map_array

        def submit_and_wait(executor: Any, *args: Any, **kwargs: Any) -> list[Any]:
            submitted.extend(map_array(executor, *args, **kwargs))
            self.wait(submitted)
            return [Read()] * len(submitted)  # read below, each job once, none raising

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
        jobs = zip(submitted, job_overrides, strict=True)
        return [job_return(job, list(o), initial_job_idx + i) for i, (job, o) in enumerate(jobs)]

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


class Read:
    """What Hydra's launch reads in place of a job: the jobs' own returns are read after it, each once."""

    def results(self) -> list[None]:
        return [None]


def job_return(job: Any, overrides: list[str], num: int) -> JobReturn:
    """The job's own JobReturn; for a job SLURM ended without one (scancel, a time limit, a node lost),
    a FAILED one that says so, also on stderr."""
    state = job.watcher.get_state(job.job_id, mode="cache")
    if job.paths.result_pickle.exists() or state == "COMPLETED":  # (a slow shared disk: results waits)
        try:
            return job.results()[0]
        except Exception as err:
            message = f"SLURM job {job.job_id} {state}: {str(err).splitlines()[0]}"
    else:
        message = f"SLURM job {job.job_id} ended {state} without a result (log: {job.paths.stderr})"
    varied = " ".join(o for o in overrides if is_experiment(o))
    print(f"bpexp: job #{num} {varied}: {message}", file=sys.stderr)
    failed = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    failed.return_value = RuntimeError(message)
    return failed
