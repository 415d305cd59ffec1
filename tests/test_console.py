"""The terminal's text from hand-made results: both diagnoses, plural words, job and sweep lines."""

from pathlib import Path

from bpexp.console import count, job_line, summary, sweep_line
from bpexp.names import diagnosis_change, is_experiment
from bpexp.result import RunResult


def test_a_diagnosis_shows_where_it_started():
    assert diagnosis_change("vanishing", "healthy") == "vanishing → healthy"
    assert diagnosis_change("healthy", "healthy") == "healthy"
    assert diagnosis_change(None, "diverged") == "diverged"


def test_summary_of_a_run_that_healed_and_of_one_step():
    result = RunResult(name="r", outcome="completed", diagnosis="healthy", diagnosis_init="vanishing")
    result.initial = {"delta/log10_ratio": -4.1, "delta_norm/l001": 1e-4, "delta_norm/l002": 1.0}
    result.metrics = {"delta/log10_ratio": -0.5, "train/loss": 0.2, "val/loss": 0.25}
    result.steps, result.seconds = 1, 0.5
    text = summary(result)
    assert text.splitlines()[0] == "bpexp run r (not tracked): completed, vanishing → healthy"
    assert "; 1 step in 0.5 s" in text and "1 steps" not in text
    assert "10^-4.10 at init" in text and "10^-0.50 after training" in text


def test_a_run_without_probes_says_so():
    result = RunResult(name="r", diagnosis="unprobed", metrics={"train/loss": 0.3}, out_dir=Path("/x"))
    lines = summary(result).splitlines()
    assert lines[0].endswith("completed, unprobed") and "probes off" in lines[1]


def test_job_lines_name_what_the_job_varies():
    overrides = ["tracking.uri=sqlite:////tmp/a.db", "model.depth=8", "hydra.launcher.n_jobs=2", "seed=1"]
    result = RunResult(name="r", diagnosis="healthy", diagnosis_init="vanishing", metrics={"val/loss": 0.5})
    line = job_line(result, 2, overrides, jobs=9)
    assert line.startswith("[3/9] model.depth=8 seed=1: completed, vanishing → healthy, loss 0.5")
    assert "tracking" not in line and "hydra" not in line
    skipped = RunResult(name="r", diagnosis="healthy", run_id="abc", skipped=True)
    assert "skipped" in job_line(skipped, 0, ["model.depth=2"], jobs=1)


def test_the_keys_that_are_not_the_experiment():
    outside = ("tracking.uri=x", "+tracking.run_name=y", "hydra.launcher.n_jobs=2", "train.threads", "device")
    for key in outside:
        assert not is_experiment(key), key
    for key in ("model.depth=3", "train.steps", "seed", "optim.lr=0.1"):
        assert is_experiment(key), key


def test_the_last_line_of_a_sweep():
    line = sweep_line("s1", {"completed": 2, "diverged": 1}, ["healthy", "healthy", "diverged"], 0, "R")
    assert line == "sweep s1: 3 jobs: 2 completed, 1 diverged (healthy ×2, diverged ×1). Report: R"
    assert sweep_line("s1", {}, [], 9, "R") == "sweep s1: 9 skipped. Report: R"
    assert sweep_line("s1", {"completed": 1}, ["healthy"], 2, "R") == (
        "sweep s1: 1 job: 1 completed (healthy ×1); 2 skipped. Report: R"
    )
    assert count(1, "config") == "1 config" and count(2, "config") == "2 configs"
