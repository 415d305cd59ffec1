"""A Hydra multirun as one object in MLflow: one parent run per sweep, every job's run its child.

Over 400 lines: the callback's two sides (the launching process and each job's process) share one
pickled state and are only understood together.

`SweepCallback` (conf/train.yaml: hydra.callbacks.sweep) works in two places:

- the launching process (on_multirun_start, on_multirun_end): it creates the store, the experiment and
  the parent run before any job starts (jobs that start together would race on SQLite schema creation
  and on experiment creation), and at the end writes the sweep's summary on the parent: counts per
  outcome, the overrides, and `runs.csv` / `runs.parquet` (one row per child: params, final metrics).
  The end comes also after a failed job or a launcher that failed to submit (Hydra raises before
  on_multirun_end), Ctrl-C or SIGTERM: an atexit hook then ends the children still RUNNING (a joblib
  worker killed by its pool cannot) and the parent as FAILED, or KILLED when interrupted. Its last line
  on stdout counts this launch's jobs per outcome and per diagnosis and gives the command that reports
  the sweep; the launchers' own INFO lines (`#n : …`, `Joblib.Parallel(…)`) are silenced.
- each job's process (on_job_start, on_job_end): the same process for the basic launcher, a reused
  worker for joblib, another machine for submitit. The callback arrives there pickled with its state
  (`SweepState`, plain data). It resets the process (no active MLflow run, the MLFLOW_* variables as at
  launch, seeds, threads, determinism), hands train() the sweep link in $BPEXP_SWEEP (tracking.py), and
  records a job that raised before its run existed (a corrupt data file, a config out of range) as a
  FAILED child with its traceback.

Resume: `sweep.resume=true` on the same command reopens the sweep's parent run (same overrides and
sweeper params: tag `bpexp.sweep_key`), and each job whose config already has a FINISHED run in the
experiment (tag `bpexp.config_hash`) is skipped by train.main.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bpexp.config import ConfigError, TrackingBackend, TrackingConfig, config_hash, flatten
from bpexp.console import outcomes_text, sweep_line
from bpexp.lifecycle import process_alive, sigterm_as_interrupt, slurm_job
from bpexp.names import OUTCOMES, SWEEP_ROLE, Outcome, Tag, diagnosis_change
from bpexp.store import close_abandoned_sweeps, default_tracking_uri, latest_runs, quote, search_all
from bpexp.tracking import SWEEP_ENV, Tracker, check_reachable, resolve_uri

log = logging.getLogger("bpexp.sweep")
SWEEP_KEYS = ("sweep.", "+sweep.", "++sweep.")  # overrides that change how a sweep runs, not what it is
# The launchers announce every job at INFO (`#3 : model.depth=8`, `Joblib.Parallel(…) is launching`):
# the job line that train.main prints says the same, with the outcome.
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins")


@dataclass
class SweepState:
    """What a job's process needs to know about its sweep: plain data, pickled with the callback."""

    sweep_id: str
    parent_run_id: str
    uri: str
    experiment: str
    mlflow_env: dict[str, str] = field(default_factory=dict)  # MLFLOW_* in the launching process
    jobs: int | None = None  # how many jobs the sweep launches, when known
    launcher_pid: int = 0  # the launching process: a job in another process stops when it dies
    launched_ms: int = 0  # this launch's start (the launching process's clock)


class SweepCallback(Callback):
    launching: SweepState | None = None  # the launching process's sweep, while it runs (launching_link)

    def __init__(self) -> None:
        self.state: SweepState | None = None
        self.tracker: Tracker | None = None  # launching process: the parent run
        self.interrupted = False
        self.ended = False
        self.launched_ms = 0  # this launch's start: a resumed sweep also has children from earlier ones
        self.hooks: ExitStack | None = None
        self.job_started_ms = 0
        self.lost: list[str] = []  # one line per job that failed or was killed, for the last words

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state}  # never the client, hooks or handlers of the launching process

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.__init__()
        self.state = saved["state"]

    # ---------------------------------------------------------------------------------------------
    # The launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for name in LAUNCHER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        node = config.tracking  # only these keys: run_name may interpolate values of a job
        if node.backend != TrackingBackend.mlflow:  # tracking=none: no store, no parent
            return
        tracking = TrackingConfig(uri=node.uri, experiment=node.experiment)
        uri = resolve_uri(tracking, Path(config.hydra.runtime.cwd))
        try:
            check_reachable(uri)
        except ConfigError as err:
            print(f"bpexp: {err}", file=sys.stderr)
            sys.exit(2)  # a callback's exception would only be a warning, and every job would fail
        overrides = [o for o in config.hydra.overrides.task if not o.startswith(SWEEP_KEYS)]
        if not composes(config, overrides):
            return  # Hydra fails the sweep before any job with its own message: no parent, no store
        self.tracker = Tracker(uri, tracking.experiment)
        experiment_id = self.tracker.experiment_id()  # creates the schema and the experiment, once
        close_abandoned_sweeps(self.tracker.client, [experiment_id])  # before one is resumed
        self.launched_ms = int(time.time() * 1000)
        key = sweep_key(config, overrides)
        parent = None
        if OmegaConf.select(config, "sweep.resume", default=False):
            parent = self.find_parent(experiment_id, key)
        if parent is not None:
            sweep_id = parent.data.tags[Tag.sweep]
            self.tracker.run_id = parent.info.run_id
            self.tracker.client.update_run(parent.info.run_id, status="RUNNING")
            log.debug("sweep %s resumed (parent run %s)", sweep_id, parent.info.run_id)
        else:
            sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            self.start_parent(config, sweep_id, key, overrides)
        self.tracker.set_tags(
            {
                Tag.launcher_host: socket.gethostname(),
                Tag.launcher_pid: str(os.getpid()),
                Tag.launched_at: str(self.launched_ms),
            }
        )
        self.state = SweepState(
            sweep_id=sweep_id,
            parent_run_id=self.tracker.run_id,
            uri=uri,
            experiment=tracking.experiment,
            mlflow_env={k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
            jobs=count_jobs(config, overrides),
            launcher_pid=os.getpid(),
            launched_ms=self.launched_ms,
        )
        SweepCallback.launching = self.state
        self.install_hooks()
        log.debug("sweep %s: parent run %s in %s", sweep_id, self.tracker.run_id, uri)

    def find_parent(self, experiment_id: str, key: str) -> Any | None:
        runs = self.tracker.client.search_runs(
            [experiment_id],
            f"tags.`{Tag.sweep_key}` = '{key}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def start_parent(self, config: DictConfig, sweep_id: str, key: str, overrides: list[str]) -> None:
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        launcher = OmegaConf.select(config, "hydra.launcher._target_", default="")
        command = " ".join(["python -m bpexp.train -m", *overrides])
        tags = {Tag.sweep: sweep_id, Tag.sweep_key: key, Tag.role: SWEEP_ROLE, Tag.note: f"`{command}`"}
        params = {
            "sweep.overrides": " ".join(overrides)[:6000],
            "sweep.sweeper": sweeper.get("_target_", ""),
            "sweep.launcher": launcher,
            "sweep.dir": str(config.hydra.sweep.dir),
        }
        study = OmegaConf.select(config, "hydra.runtime.choices.experiment") or "sweep"
        self.tracker.start(f"{study}-{sweep_id}", params, tags)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sweep.yaml"
            spec = {"command": command, "overrides": overrides, "sweeper": sweeper, "launcher": launcher}
            path.write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
            self.tracker.log_artifact(path)

    def install_hooks(self) -> None:
        """SIGTERM unwinds like Ctrl-C; an uncaught KeyboardInterrupt marks the sweep interrupted."""
        previous_hook = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            self.interrupted = self.interrupted or issubclass(kind, KeyboardInterrupt)
            previous_hook(kind, value, tb)

        def interrupted() -> None:
            self.interrupted = True

        self.hooks = ExitStack()
        self.hooks.enter_context(sigterm_as_interrupt(on_signal=interrupted))
        sys.excepthook = excepthook
        self.hooks.callback(setattr, sys, "excepthook", previous_hook)
        atexit.register(self.end_at_exit)
        self.hooks.callback(atexit.unregister, self.end_at_exit)

    def remove_hooks(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.state is None:
            return
        self.remove_hooks()
        if self.announce(self.end(completed=True)):
            sys.exit(1)  # also under a sweeper that carries on after failures (optuna's max_failure_rate)

    def end_at_exit(self) -> None:
        """After a failed job or launch (Hydra raised and exits 1), Ctrl-C or SIGTERM: on_multirun_end
        never ran, so the sweep did not finish."""
        self.remove_hooks()
        self.announce(self.end(completed=False))

    def announce(self, counts: Counter[str]) -> int:
        """Say on stderr how many jobs failed (or were killed); return that number."""
        failed = counts.get(Outcome.failed, 0) + counts.get(Outcome.killed, 0)
        if self.interrupted:
            print(f"bpexp: sweep {self.state.sweep_id} interrupted: {outcomes_text(counts)}", file=sys.stderr)
        elif failed:
            jobs = sum(counts.values())
            print(f"bpexp: sweep {self.state.sweep_id}: {failed} of {jobs} jobs failed", file=sys.stderr)
            for line in self.lost:
                print(f"  {line}", file=sys.stderr)
        return failed

    def end(self, completed: bool) -> Counter[str]:
        """Children left RUNNING end KILLED (or FAILED), then the summary, the parent's status, the last
        line. `completed`: Hydra reached on_multirun_end (else a launch or a job raised, or a signal)."""
        if self.ended:
            return Counter()
        self.ended = True
        SweepCallback.launching = None
        client = self.tracker.client
        lost = Outcome.killed if self.interrupted else Outcome.failed  # a process that died with its run open
        children = self.children()
        running = [run for run in children if run.info.status == "RUNNING"]
        for run in running:
            client.set_tag(run.info.run_id, Tag.outcome, lost)
            client.set_terminated(run.info.run_id, lost.upper())
        if running:  # read again as they now are (a search of M runs reads every value: ~20 ms a run)
            children = self.children()
        latest = latest_runs(children)  # a resumed sweep's job has a run per launch: the last one counts
        counts = Counter(run.data.tags.get(Tag.outcome, Outcome.failed) for run in latest)
        self.lost = [lost_line(run) for run in latest if run.info.status in ("FAILED", "KILLED")]
        metrics = {f"sweep/{outcome}": float(counts.get(outcome, 0)) for outcome in OUTCOMES}
        metrics["sweep/jobs"] = float(len(latest))
        launched = [r for r in latest if r.info.start_time >= self.launched_ms]
        metrics["sweep/launched"] = float(len(launched))
        self.tracker.log_metrics(metrics, step=0)
        self.tracker.set_tags({Tag.summary: outcomes_text(counts)})
        with tempfile.TemporaryDirectory() as folder:
            table = runs_table(children)
            table.to_csv(Path(folder) / "runs.csv", index=False)
            table.to_parquet(Path(folder) / "runs.parquet", index=False)
            self.tracker.log_artifact(Path(folder) / "runs.csv")
            self.tracker.log_artifact(Path(folder) / "runs.parquet")
        if self.interrupted:
            status = "KILLED"
        elif not completed or counts.get(Outcome.failed) or counts.get(Outcome.killed):
            status = "FAILED"
        else:
            status = "FINISHED"
        self.tracker.end(status)
        print(self.last_line(launched, len(latest)), flush=True)
        return counts

    def last_line(self, launched: list[Any], jobs: int) -> str:
        """This launch's jobs per outcome and diagnosis (a job skipped by sweep.resume ran nothing)."""
        outcomes = Counter(r.data.tags.get(Tag.outcome, Outcome.failed) for r in launched)
        diagnoses = [
            diagnosis_change(r.data.tags.get(Tag.diagnosis_init), r.data.tags.get(Tag.diagnosis))
            for r in launched
            if r.data.tags.get(Tag.diagnosis)
        ]
        skipped = 0 if self.interrupted else max((self.state.jobs or jobs) - len(launched), 0)
        command = f"python -m bpexp.report {self.state.sweep_id}"
        if self.state.experiment != "bpexp":
            command += f" --experiment {self.state.experiment}"
        if self.state.uri != default_tracking_uri():
            command += f" --tracking-uri {self.state.uri}"
        return sweep_line(self.state.sweep_id, outcomes, diagnoses, skipped, command)

    def children(self) -> list[Any]:
        query = f"tags.`{Tag.parent}` = {quote(self.state.parent_run_id)}"
        return search_all(self.tracker.client, [self.tracker.experiment_id()], query)

    # ---------------------------------------------------------------------------------------------
    # Each job's process

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.state is None:  # not a tracked sweep (a single run, or tracking=none)
            return
        reset_process(self.state.mlflow_env, int(config.seed), int(config.train.threads))
        job = slurm_job()
        # joblib, submitit_local: the job has its own process, and stops when its launcher dies. Not a
        # SLURM job: it outlives its launcher by design, on a host where the launcher's pid means nothing.
        if os.getpid() != self.state.launcher_pid and job is None:
            LauncherWatch.start(self.state.launcher_pid)
        link = job_link(self.state, int(config.hydra.job.num), str(config.hydra.runtime.output_dir))
        os.environ[SWEEP_ENV] = json.dumps(link)
        self.job_started_ms = int(time.time() * 1000)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.state is None:
            return
        try:
            if job_return.status == JobStatus.FAILED:
                self.record_failure(config, job_return)
        finally:
            LauncherWatch.job_frame = None
            os.environ.pop(SWEEP_ENV, None)
            reset_process(self.state.mlflow_env)

    def record_failure(self, config: DictConfig, job_return: JobReturn) -> None:
        """A job that raised before train() created its run still leaves a FAILED child, with traceback."""
        tracker = Tracker(self.state.uri, self.state.experiment, self.state.parent_run_id)
        job_dir = str(config.hydra.runtime.output_dir)
        # This launch's run of the job: one the batched launcher created before the job started counts
        # (the launch's start, on the launching machine's clock, or the job's own if that is earlier).
        started_ms = min(self.job_started_ms, self.state.launched_ms or self.job_started_ms)
        # By values that cannot hold a quote (a job number, a run id): MLflow's filter strings keep a
        # backslash-escaped quote as it is, so a folder named `it's` would match nothing.
        own = tracker.client.search_runs(
            [tracker.experiment_id()],
            f"tags.`{Tag.parent}` = '{self.state.parent_run_id}' and tags.`{Tag.job}` = "
            f"'{int(config.hydra.job.num)}' and attributes.start_time >= {started_ms}",
            max_results=1,
        )
        if own:  # train() recorded it (FAILED, with traceback.txt)
            return
        try:
            job_return.return_value  # noqa: B018 (raises the job's exception)
        except Exception as raised:
            error = raised
        tags = {
            Tag.sweep: self.state.sweep_id,
            Tag.job: str(config.hydra.job.num),
            Tag.job_dir: job_dir,
            Tag.outcome: Outcome.failed,
            Tag.error: f"{type(error).__name__}: {error}"[:5000],
        }
        try:
            params = {k: v for k, v in flatten(job_return.cfg).items() if not k.startswith("sweep.")}
            tags[Tag.config_hash] = config_hash(job_return.cfg)
        except Exception:  # a config that does not even resolve (a missing value): its overrides say it
            params = {"overrides": " ".join(job_return.overrides)}
        tracker.start(f"sweep-{self.state.sweep_id}-job{config.hydra.job.num}", params, tags)
        path = Path(job_dir) / "traceback.txt"
        path.write_text("".join(traceback.format_exception(error)))
        tracker.log_artifact(path)
        tracker.end("FAILED")


class LauncherWatch:
    """In a job's own process: when the launching process dies (kill -9, OOM), stop as it would have
    stopped us. A daemon thread polls the launcher; once it is gone, a job in progress gets SIGTERM
    (train.recorded ends its run KILLED, as for any SIGTERM), and the process exits once the job has
    unwound, or at once when idle. Without it a joblib worker, re-parented to PID 1, trains on to the
    end of its job and takes the next from a queue no one reads; its parent's run is closed by
    store.close_abandoned_sweeps the next time the store is read."""

    POLL_SECONDS = 0.5
    UNWIND_SECONDS = 120  # the job's run ends within the writer's bounded drain; then exit regardless
    watched: int | None = None  # the launcher pid this process watches (one thread per process)
    job_frame: Any = None  # Hydra's run_job frame of the job in progress, None between jobs

    @classmethod
    def start(cls, pid: int) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "run_job":
            frame = frame.f_back
        cls.job_frame = frame or sys._getframe(1)
        if cls.watched != pid:
            cls.watched = pid
            child = os.getppid() == pid  # a re-parented child is sure: no pid can come back to it
            threading.Thread(
                target=cls.watch, args=(pid, child), name="bpexp-launcher-watch", daemon=True
            ).start()

    @classmethod
    def watch(cls, pid: int, child: bool) -> None:
        while (os.getppid() == pid) if child else process_alive(pid):
            time.sleep(cls.POLL_SECONDS)
        if cls.in_job():
            log.warning("launcher process %s is gone: stopping this job (its run ends KILLED)", pid)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + cls.UNWIND_SECONDS
            while cls.in_job() and time.monotonic() < deadline:
                time.sleep(0.05)
        os._exit(143)  # 128 + SIGTERM, as the shell reports it

    @classmethod
    def in_job(cls) -> bool:
        """Whether the main thread is still inside the job (its frame on the main thread's stack)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None:
            if frame is cls.job_frame:
                return True
            frame = frame.f_back
        return False


def lost_line(run: Any) -> str:
    """`#2 seed=2: killed (SLURM job 7_2: SIGTERM …)`: which job, and why, in one line."""
    tags = run.data.tags
    varied = (run.info.run_name or "").split(" · ")[0]
    why = (tags.get(Tag.killed_by) or tags.get(Tag.error) or run.info.status).splitlines()[0][:200]
    return f"#{tags.get(Tag.job, '?')} {varied}: {tags.get(Tag.outcome, Outcome.failed)} ({why})"


def job_link(state: SweepState, job_num: int, output_dir: str) -> dict[str, Any]:
    """What a job's run needs to join its sweep ($BPEXP_SWEEP, tracking.sweep_link); in a SLURM job
    also the job's id, as squeue and scancel name it."""
    tags = {Tag.sweep: state.sweep_id, Tag.job: str(job_num), Tag.job_dir: output_dir}
    if job := slurm_job():
        tags[Tag.slurm_job] = job
    return {
        "uri": state.uri,
        "experiment": state.experiment,
        "parent_run_id": state.parent_run_id,
        "jobs": state.jobs,
        "tags": tags,
    }


def launching_link(job_num: int, output_dir: str) -> dict[str, Any] | None:
    """In the launching process, before the job starts: the link on_job_start will give it (the batched
    launcher creates a population's runs before training it). None outside a tracked sweep."""
    return job_link(SweepCallback.launching, job_num, output_dir) if SweepCallback.launching else None


@contextmanager
def launching_in_job(callbacks: Any) -> Iterator[None]:
    """A SLURM job that trains a population (hydra/launcher=batched_slurm) creates its members' runs
    before their jobs start, as the launching process does on one machine: in the sweep that the
    job's SweepCallback brought with it, pickled with its state (Hydra's callbacks, hydra_context's)."""
    found = [c.state for c in callbacks.callbacks if isinstance(c, SweepCallback) and c.state]
    SweepCallback.launching = found[0] if found else None
    try:
        yield
    finally:
        SweepCallback.launching = None


def sweep_axes(config: DictConfig, overrides: list[str]) -> dict[str, Any] | None:
    """The sweep's axes by key (the command line wins over the sweeper's params); None when the parser
    rejects an override (that fails the sweep on its own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*overrides, *params])
    except Exception:
        return None
    return {o.get_key_element(): o for o in parsed if o.is_sweep_override()}


def composes(config: DictConfig, overrides: list[str]) -> bool:
    """Whether every value of every axis composes (a value that cannot, `model.activation=relux`, fails
    the whole sweep in Hydra before any job starts): the first job composed, then each value once, the
    other axes at their first, so a sweep of N axes costs the sum of their lengths, not their product.
    A value of a key that is not a config group is checked as Hydra applies it after composing (one
    OmegaConf.update against the schema, ~1000× cheaper than a composition); a group's value composes."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = sweep_axes(config, overrides)
    if "n_trials" in config.hydra.sweeper or not axes or not GlobalHydra.instance().is_initialized():
        return True  # a sampling sweeper draws its values later; nothing to check ahead
    fixed = [o for o in overrides if o.split("=", 1)[0] not in axes]
    first = {key: next(iter(axis.sweep_string_iterator())) for key, axis in axes.items()}
    loader, parser = GlobalHydra.instance().config_loader(), OverridesParser.create()

    def job(key: str, value: str) -> list[str]:
        return [*fixed, *(f"{k}={value if k == key else v}" for k, v in first.items())]

    try:
        composed = loader.load_sweep_config(master_config=config, sweep_overrides=job("", ""))
        for key, axis in axes.items():
            group = axis.is_add() or bool(loader.get_group_options(axis.key_or_group))
            for value in list(axis.sweep_string_iterator())[1:]:
                if group:
                    loader.load_sweep_config(master_config=config, sweep_overrides=job(key, value))
                else:
                    value_override = parser.parse_overrides([f"{key}={value}"])
                    ConfigLoaderImpl._apply_overrides_to_config(value_override, composed)
    except Exception:
        return False
    return True


def count_jobs(config: DictConfig, overrides: list[str]) -> int | None:
    """How many jobs the sweep launches: the product of its sweep axes (an Optuna sweep: n_trials)."""
    if "n_trials" in config.hydra.sweeper:
        return int(config.hydra.sweeper.n_trials)
    axes = sweep_axes(config, overrides)
    if axes is None:
        return None
    jobs = 1
    for override in axes.values():
        jobs *= len(list(override.sweep_string_iterator()))
    return jobs


def sweep_key(config: DictConfig, overrides: list[str]) -> str:
    """What makes two launches the same sweep: the command's overrides and the sweeper's params."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    text = json.dumps({"overrides": sorted(overrides), "sweeper": sweeper}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reset_process(mlflow_env: dict[str, str], seed: int | None = None, threads: int | None = None) -> None:
    """Make a reused worker start a job as a fresh process would (the joblib launcher reuses them)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:  # a fluent run left open by the previous job's code
        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in mlflow_env]:
        del os.environ[key]
    os.environ.update(mlflow_env)
    if seed is None:
        return
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads or 1)
    torch.use_deterministic_algorithms(False)


def runs_table(runs: list[Any]) -> Any:
    """One row per child: run info, the bpexp tags, every param (dotted key), every final metric."""
    import pandas as pd

    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
        }
        for tag in (Tag.outcome, Tag.diagnosis, Tag.config_hash, Tag.job, Tag.job_dir):
            row[tag.removeprefix("bpexp.")] = tags.get(tag)
        row.update(run.data.params)
        row.update(run.data.metrics)
        rows.append(row)
    table = pd.DataFrame(rows)
    params = sorted({k for run in runs for k in run.data.params})
    if params:
        table[params] = table[params].astype("string")  # params are strings in MLflow; keep them so
    return table
