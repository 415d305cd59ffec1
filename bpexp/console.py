"""What a user reads on the terminal: a run's summary, a sweep's job lines and last line, progress fields.

Torch-free: it reads a RunResult and the names module, so train.py, sweep.py and the report share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bpexp.names import (
    OUTCOMES,
    Diagnosis,
    Metric,
    Quantity,
    counts_text,
    diagnosis_change,
    is_experiment,
    split_key,
)
from bpexp.result import RunResult


def count(n: int, word: str) -> str:
    """'1 step', '3 steps'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(result: RunResult) -> str:
    """The few lines a user reads at the end of a run; the numbers are the run's own metrics."""
    m, init = result.metrics, result.initial
    state = diagnosis_change(result.diagnosis_init, result.diagnosis)
    lines = [f"bpexp run {result.name} ({result.run_id or 'not tracked'}): {result.outcome}, {state}"]
    if why := diagnosis_reason(result):
        lines.append(f"  {why}")
    if Metric.delta_ratio in init:
        L = sum(split_key(k)[0] == Quantity.delta_norm for k in init)
        line = f"  δ from layer {L} to layer 1: 10^{init[Metric.delta_ratio]:+.2f} at init"
        if Metric.theory_delta_ratio in m:
            line += f" (theory 10^{m[Metric.theory_delta_ratio]:+.2f}: {result.theory_check()})"
        if result.steps and Metric.delta_ratio in m:
            line += f", 10^{m[Metric.delta_ratio]:+.2f} after training"
        lines.append(line)
    losses = [f"{k} {m[k]:.4g}" for k in (Metric.val_loss, Metric.val_acc) if k in m]
    if Metric.train_loss in init and result.steps:
        start, end = init[Metric.train_loss], m[Metric.train_loss]
        losses.insert(0, f"train/loss {start:.4g} at step 0, {end:.4g} at the end")
    elif Metric.train_loss in m:
        losses.insert(0, f"train/loss {m[Metric.train_loss]:.4g}")
    seconds = result.seconds or result.loop_seconds
    lines.append(f"  {', '.join(losses)}; {count(result.steps, 'step')} in {seconds:.1f} s")
    if result.out_dir is not None:
        lines.append(f"  artifacts: {result.out_dir} (config.yaml, dynamics.parquet, plots/)")
    if result.ui_url and result.tracking_uri and not result.tracking_uri.startswith("http"):
        lines.append(f"  open: mlflow ui --backend-store-uri {result.tracking_uri}, then {result.ui_url}")
    elif result.ui_url:
        lines.append(f"  open: {result.ui_url}")
    return "\n".join(lines)


def diagnosis_reason(result: RunResult) -> str:
    """The numbers behind a diagnosis that the δ line does not show."""
    m = result.metrics
    match result.diagnosis:
        case Diagnosis.diverged:
            step, layer = result.diverged_step, result.diverged_layer
            return f"loss non-finite at step {step}, first non-finite layer {layer}"
        case Diagnosis.dead_units:
            share, layer = max((v, split_key(k)[1]) for k, v in m.items() if split_key(k)[0] == Quantity.dead)
            return f"{share:.0%} of the units of layer {layer} are dead on the whole batch"
        case Diagnosis.saturated:
            shares = [v for k, v in m.items() if split_key(k)[0] == Quantity.saturation]
            return f"{sum(shares) / len(shares):.0%} of hidden units saturated (f' < 5% of its maximum)"
        case Diagnosis.unprobed:
            return "probes off (probes=off): no per-layer evidence, so no diagnosis"
    return ""


def progress_fields(metrics: Mapping[str, float], diagnosis: str) -> dict[str, str]:
    """What the progress bar shows after a probe: the batch loss, the δ ratio, the diagnosis so far."""
    return {
        "loss": f"{metrics[Metric.train_loss]:.4g}",
        "δ": f"10^{metrics[Metric.delta_ratio]:+.1f}",
        "": diagnosis,
    }


def experiment_overrides(overrides: Iterable[str]) -> list[str]:
    """A job's overrides less those that are not the experiment (tracking.uri=…, hydra.…, sweep.…)."""
    return [o for o in overrides if is_experiment(o)]


def job_line(result: RunResult, num: int, overrides: Iterable[str], jobs: int | None = None) -> str:
    """One line per finished job of a sweep: index/total, what it varies, outcome, diagnoses, loss, time."""
    head = f"[{num + 1}{f'/{jobs}' if jobs else ''}] {' '.join(experiment_overrides(overrides))}"
    state = f"{result.outcome}, {diagnosis_change(result.diagnosis_init, result.diagnosis)}"
    if result.skipped:
        return f"{head}: skipped (sweep.resume: FINISHED as run {result.run_id}, {state})"
    return f"{head}: {state}, loss {result.loss:.4g}, {result.seconds:.1f} s"


def outcomes_text(outcomes: Mapping[str, int]) -> str:
    """'6 jobs: 4 completed, 1 diverged, 1 failed' (outcomes in their fixed order)."""
    parts = [f"{outcomes[o]} {o}" for o in OUTCOMES if outcomes.get(o)]
    return f"{count(sum(outcomes.values()), 'job')}: {', '.join(parts) or 'none'}"


def sweep_line(
    sweep_id: str, outcomes: Mapping[str, int], diagnoses: Iterable[str], skipped: int, report: str
) -> str:
    """The sweep's last line: this launch's jobs per outcome and per diagnosis, then how to report it."""
    ran = sum(outcomes.values())
    parts = []
    if ran:
        states = counts_text(diagnoses)
        parts.append(outcomes_text(outcomes) + (f" ({states})" if states else ""))
    if skipped:
        parts.append(f"{skipped} skipped")
    text = f"sweep {sweep_id}: {'; '.join(parts) or '0 jobs'}"
    return f"{text}. Report: {report}"
