"""What one run returns: its outcome, its diagnoses at initialization and at the end, its last metrics.

Below both train.py (which fills it) and console.py (which prints it), so neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bpexp.names import Diagnosis, Metric, Outcome

DIVERGED_OBJECTIVE = 1e300  # finite and worse than any float32 loss: what a sweeper sees for a NaN run
THEORY_TOLERANCE = 0.5  # decades: measured δ ratio at step 0 this close to the prediction "agrees"


@dataclass
class RunResult:
    name: str = ""  # the run's name in the store
    outcome: Outcome = Outcome.completed
    diagnosis: Diagnosis = Diagnosis.pending  # at the end of training
    diagnosis_init: Diagnosis = Diagnosis.unprobed  # at initialization (step 0)
    initial: dict[str, float] = field(default_factory=dict)  # the probes at initialization (step 0)
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of every metric
    run_id: str | None = None
    steps: int = 0  # optimizer steps taken
    diverged_step: int | None = None
    diverged_layer: int | None = None
    seconds: float = 0.0  # wall time of the whole run, from the store's run creation to its end
    loop_seconds: float = 0.0  # the training loop alone: steps, probes, evaluation and metric logging
    out_dir: Path | None = None  # where the artifacts were written
    ui_url: str | None = None  # this run's page in the MLflow UI
    tracking_uri: str | None = None
    skipped: bool = False  # sweep.resume found this config FINISHED: nothing ran

    @property
    def loss(self) -> float:
        """The final validation loss, else the last training loss, else NaN."""
        return self.metrics.get(Metric.val_loss, self.metrics.get(Metric.train_loss, math.nan))

    @property
    def objective(self) -> float:
        """The loss for a sweeper: always finite, DIVERGED_OBJECTIVE unless the run completed."""
        loss = self.loss
        return loss if self.outcome == Outcome.completed and math.isfinite(loss) else DIVERGED_OBJECTIVE

    def theory_check(self) -> str:
        """Does the δ ratio measured at initialization match the mean-field prediction? (theory.py)"""
        predicted = self.metrics.get(Metric.theory_delta_ratio)
        measured = self.initial.get(Metric.delta_ratio)
        if predicted is None or measured is None:
            return "no prediction"
        return "agrees" if abs(measured - predicted) <= THEORY_TOLERANCE else "differs"
