"""The names others depend on: metric keys, tags, outcomes, diagnoses, what is not the experiment.

The ground floor: no torch, no MLflow, no Hydra, so training, sweeps, analysis and the report all import
it and spell each name once. docs/design.md ("Names that others depend on") documents what is here.
The enums are StrEnums: their members *are* the strings stored in MLflow (`Outcome.completed ==
"completed"`), so a run recorded before this module existed reads back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import StrEnum

import numpy as np

TINY = 1e-300  # floor before log10, so an exact-zero norm gives a finite (very negative) ratio


# --------------------------------------------------------------------------------------------------
# Metric keys


def layer_key(quantity: str, l: int) -> str:
    """`grad_norm/l007`: zero-padded so the MLflow UI sorts layers in order."""
    return f"{quantity}/l{l:03d}"


def split_key(key: str) -> tuple[str, int | None]:
    """Inverse of layer_key: 'grad_norm/l007' -> ('grad_norm', 7); 'train/loss' -> ('train/loss', None)."""
    quantity, _, last = key.rpartition("/")
    if quantity and last[:1] == "l" and last[1:].isdigit():
        return quantity, int(last[1:])
    return key, None


class Metric(StrEnum):
    """Network-level metric keys (per-layer ones are layer_key(quantity, l))."""

    train_loss = "train/loss"
    val_loss = "val/loss"
    train_acc = "train/acc"
    val_acc = "val/acc"
    grad_norm_total = "grad_norm/total"
    delta_ratio = "delta/log10_ratio"  # log10(‖δ^(1)‖/‖δ^(L)‖): < 0 vanishing, > 0 exploding
    delta_slope = "delta/slope"  # decades per layer
    grad_ratio = "grad/log10_ratio"
    grad_slope = "grad/slope"
    theory_delta_ratio = "theory/delta_log10_ratio"
    diverged_step = "diverged/step"
    gradcheck = "gradcheck/max_rel_err"
    # Per-example gradient statistics over the probe's examples (instruments.py)
    grad_noise_total = "grad_noise/total"  # tr Σ of the whole parameter vector
    gns_total = "gns/total"  # B_simple = tr Σ / |G|² (McCandlish et al. 2018)
    gns_smoothed = "gns/smoothed"  # tr Σ and |G|² each smoothed over probe steps (EMA), then their ratio
    gsnr_total = "gsnr/total"  # the mean over parameters of Ḡ_p²/s_p² (Liu et al. 2020)
    # The input-output Jacobian's squared singular values σ², at a few training inputs
    jacobian_sv2_mean = "jacobian/sv2_mean"
    jacobian_sv2_var = "jacobian/sv2_var"
    jacobian_sv2_nvar = "jacobian/sv2_nvar"  # (m2 − m1²)/m1²: 0 = dynamical isometry
    jacobian_sv_max = "jacobian/sv_max"
    jacobian_sv2_p05 = "jacobian/sv2_p05"  # percentiles of σ²: the spectrum's shape
    jacobian_sv2_p50 = "jacobian/sv2_p50"
    jacobian_sv2_p95 = "jacobian/sv2_p95"
    theory_jacobian_sv2_mean = "theory/jacobian_sv2_mean"
    theory_jacobian_sv2_nvar = "theory/jacobian_sv2_nvar"
    # The top eigenvalue of the training loss's Hessian, and 2/η of the step that follows (Cohen et al. 2021)
    sharpness_top = "sharpness/top"
    sharpness_two_over_lr = "sharpness/two_over_lr"


class Quantity(StrEnum):
    """Per-layer quantities: the part of a layer key before `/lNNN`."""

    grad_norm = "grad_norm"
    grad_norm_b = "grad_norm_b"
    delta_norm = "delta_norm"
    weight_norm = "weight_norm"
    update_ratio = "update_ratio"
    act_mean = "act_mean"
    act_std = "act_std"
    saturation = "saturation"  # share of units with f'(z) < 5% of max f' (sigmoid, tanh, softplus)
    dead = "dead"  # ReLU: share of units at 0 on the whole batch (no gradient passes)
    nonpositive = "nonpositive"  # leaky_relu, elu, selu, gelu: share at ≤ 0 on the whole batch (alive)
    grad_noise = "grad_noise"  # tr Σ of layer l's parameters (W and b): the per-example gradient variance
    gns = "gns"  # B_simple of layer l
    gsnr = "gsnr"  # mean GSNR of layer l's parameters


def profile(layer_norms: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(log10(‖·^(1)‖/‖·^(L)‖), least-squares slope of log10‖·^(l)‖ against l in decades per layer),
    the norms given for l = 1 … L. Negative: the signal shrinks toward the input (vanishing); positive:
    it grows (exploding); 10**slope is the per-layer gain."""
    logs = np.log10(np.maximum(np.asarray(layer_norms, dtype=np.float64), TINY))
    if len(logs) < 2:
        return 0.0, 0.0
    slope = np.polyfit(np.arange(1, len(logs) + 1), logs, 1)[0]
    return float(logs[0] - logs[-1]), float(slope)


# --------------------------------------------------------------------------------------------------
# Outcomes, diagnoses, tags


class Outcome(StrEnum):
    """How a run ended (tag bpexp.outcome); `running` until it does."""

    running = "running"
    completed = "completed"
    diverged = "diverged"
    failed = "failed"
    killed = "killed"


OUTCOMES = (Outcome.completed, Outcome.diverged, Outcome.failed, Outcome.killed)  # the final ones
STATUS = {  # the MLflow run status of each final outcome
    Outcome.completed: "FINISHED",
    Outcome.diverged: "FINISHED",
    Outcome.failed: "FAILED",
    Outcome.killed: "KILLED",
}


class Diagnosis(StrEnum):
    """One word for a net's backward signal at one probe step (probes.diagnose says how)."""

    pending = "pending"  # the run has not ended
    healthy = "healthy"
    vanishing = "vanishing"
    exploding = "exploding"
    saturated = "saturated"
    dead_units = "dead_units"
    diverged = "diverged"
    unprobed = "unprobed"  # probes off: no evidence either way


def diagnosis_change(init: str | None, end: str | None) -> str:
    """'vanishing → healthy' from the diagnosis at initialization to the one at the end; one word when
    both are the same (or only one is known)."""
    if not init or not end or init == end:
        return end or init or Diagnosis.unprobed
    return f"{init} → {end}"


def counts_text(values: Iterable[str]) -> str:
    """'healthy ×4, vanishing → healthy ×2': most common first, ties by name."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} ×{n}" for name, n in ordered)


class Tag(StrEnum):
    """Run tags that bpexp writes (and MLflow's own that it sets)."""

    outcome = "bpexp.outcome"
    diagnosis = "bpexp.diagnosis"  # at the end of training
    diagnosis_init = "bpexp.diagnosis_init"  # at initialization (step 0)
    theory = "bpexp.theory"  # agrees | differs | no prediction
    config_hash = "bpexp.config_hash"
    diverged_step = "bpexp.diverged_step"
    diverged_layer = "bpexp.diverged_layer"
    error = "bpexp.error"  # why a run failed: its exception, a lost store, a writer that died
    killed_by = "bpexp.killed_by"  # what stopped a KILLED run: Ctrl-C, SIGTERM, SLURM (scancel, time
    # limit), or a trainer that left it without closing it (SIGKILL, OOM, a crash)
    sweep = "bpexp.sweep"  # the sweep id, on the parent and every child
    sweep_key = "bpexp.sweep_key"  # what makes two launches the same sweep (resume)
    role = "bpexp.role"  # "sweep" on a sweep's parent run
    launcher_host = "bpexp.launcher_host"  # on a sweep's parent: the host, pid and launch time (ms) of
    launcher_pid = "bpexp.launcher_pid"  # the process that launches its jobs, so that a sweep whose
    launched_at = "bpexp.launched_at"  # launcher died can be closed (a reused pid started later)
    job = "bpexp.job"
    job_dir = "bpexp.job_dir"
    slurm_job = "bpexp.slurm_job"  # the SLURM job a sweep's job ran as (`12_3`: squeue, scancel, sacct)
    summary = "bpexp.summary"
    population = "bpexp.population"  # the id shared by the members trained together (hydra/launcher=batched)
    population_size = "bpexp.population_size"
    parent = "mlflow.parentRunId"
    note = "mlflow.note.content"  # the run's Description in the MLflow UI


SWEEP_ROLE = "sweep"  # the value of Tag.role on a sweep's parent run

# Columns store.load_runs builds from run info and tags, in this order, before params and metrics.
RUN_COLUMNS = [
    "run_id",
    "run_name",
    "status",
    "outcome",
    "diagnosis",
    "diagnosis_init",
    "diverged_step",
    "sweep",
    "parent_run_id",
    "start_time",
    "duration_s",
    "experiment_id",
    "artifact_uri",
]


# --------------------------------------------------------------------------------------------------
# What is not the experiment


# Config keys that say where a run is recorded, how it is launched or scheduled, not what it computes:
# left out of config_hash (resume), of a sweep's axes in analysis, and of a child run's name.
NOT_EXPERIMENT = ("tracking", "hydra", "sweep", "train.threads", "device")


def is_experiment(key: str) -> bool:
    """True for a dotted config key (or an override `key=value`, `+key=…`) that changes what a run
    computes; False for NOT_EXPERIMENT and everything under it (`tracking.uri`, `hydra.launcher.n_jobs`)."""
    key = key.lstrip("+~").split("=", 1)[0]
    return not any(key == k or key.startswith(f"{k}.") or key.startswith(f"{k}/") for k in NOT_EXPERIMENT)


def folder_name(text: str) -> str:
    """A name (experiment, sweep id) as one folder: no `..`, `a/../..` or `.hidden` can step out of the
    folder it goes in, nor hide in it."""
    slug = re.sub(r"[^\w.-]+", "_", text)
    return re.sub(r"^\.+", "_", slug) or "_"  # `.`, `..`, `.hidden`: never a step up nor a hidden folder
