"""What the batched launcher asks of bpexp: job configs into populations, members into lone-looking runs.

The launcher (hydra_plugins/bpexp_batched_launcher) knows Hydra only; population.py knows torch only;
this module joins them to the store. A member's run carries the params, tags, metrics and artifacts of
a lone run (config.yaml, dynamics.parquet), plus `bpexp.population` and `bpexp.population_size`. Its
gradient-profile figure is not drawn: at ~0.2 s a figure, M figures would cost more than training the
population; `python -m bpexp.report` draws a sweep's profiles from the dynamics.
"""

from __future__ import annotations

import copy
import secrets
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bpexp.config import Config, Device, config_hash, flatten, to_config
from bpexp.population import group_key, train_population
from bpexp.probes import Dynamics, diagnose
from bpexp.tracking import NullTracker, make_tracker
from bpexp.train import (
    STATUS,
    RunResult,
    job_line,
    resumed,
    run_name,
    sigterm_as_interrupt,
    summary,
    theory_check,
)


@dataclass
class Trained:
    """One member's outcome of population training, waiting to be recorded as its job's run."""

    cfg: Config  # as trained (hydra.launcher.device applied)
    result: RunResult
    dynamics: Dynamics
    params: dict[str, float]  # the prediction's params (theory.py)
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
        for i, (result, dynamics, params) in zip(ids, trained, strict=True):
            outcomes[i] = Trained(cfgs[i], result, dynamics, params, population, len(ids))
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
            cfg.tracking.run_name = f"{' '.join(overrides)} · {run_name(cfg)}"[:250]
        launch_dir, out_dir = Path(hydra_cfg.runtime.cwd), Path(hydra_cfg.runtime.output_dir)
        result = record(cfg, trained, launch_dir, out_dir)
        print(job_line(result, hydra_cfg.job.num, overrides), flush=True)
        return result.objective

    return task


def record(cfg: Config, trained: Trained, launch_dir: Path, out_dir: Path) -> RunResult:
    """The member's run, as train() leaves a lone run: created, filled, tagged and ended in one go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg.tracking, launch_dir)
    result, dynamics = trained.result, trained.dynamics
    config = {k: v for k, v in flatten(cfg).items() if not k.startswith("sweep.")}
    tags = {
        "bpexp.outcome": "running",
        "bpexp.diagnosis": "pending",
        "bpexp.config_hash": config_hash(cfg),
        "bpexp.population": trained.population,
        "bpexp.population_size": str(trained.size),
    }
    with sigterm_as_interrupt():  # from the run's creation on, SIGTERM ends it KILLED, never RUNNING
        try:
            tracker.start(run_name(cfg), {**config, **trained.params}, tags)
            result.run_id, result.out_dir, result.ui_url = tracker.run_id, out_dir, tracker.run_url()
            result.tracking_uri = tracker.uri
            for step, metrics in dynamics.records:
                tracker.log_metrics(metrics, step)
            tracker.flush()
        except KeyboardInterrupt:
            result.outcome = "killed"
            raise
        except Exception:
            result.outcome = "failed"
            (out_dir / "traceback.txt").write_text(traceback.format_exc())
            tracker.log_artifact(out_dir / "traceback.txt")
            raise
        finally:
            finish(cfg, result, dynamics, tracker, out_dir)
    return result


def finish(cfg: Config, result: RunResult, dynamics: Dynamics, tracker: NullTracker, out_dir: Path) -> None:
    """train.finish without the figure: tags, the divergence record, config.yaml and dynamics.parquet."""
    try:
        tags = {"bpexp.outcome": result.outcome, "bpexp.diagnosis": result.diagnosis}
        if result.initial:
            tags["bpexp.diagnosis_init"] = diagnose(result.initial)
            tags["bpexp.theory"] = theory_check(result)
        if result.diverged_step is not None:
            tags["bpexp.diverged_step"] = str(result.diverged_step)
            tags["bpexp.diverged_layer"] = str(result.diverged_layer)
            tracker.log_metrics({"diverged/step": result.diverged_step}, result.diverged_step)
        tags["mlflow.note.content"] = summary(result, cfg)
        tracker.set_tags(tags)
        if result.outcome in ("completed", "diverged"):
            config_path = out_dir / "config.yaml"
            config_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            tracker.log_artifact(config_path)
            tracker.log_artifact(dynamics.write(out_dir / "dynamics.parquet"))
    finally:
        tracker.end(STATUS[result.outcome])
