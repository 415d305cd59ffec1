"""The report's study sections on hand-made summaries whose answers are known."""

import itertools

import numpy as np
import pandas as pd
import pytest

from bpexp.config import Activation
from bpexp.correlations import trainable_depth
from bpexp.studies import effects_section, sections, trainability_section


def factorial_summary(seeds=4):
    """Batch norm lowers the loss by 1.0; ReLU+He by 1.5 but only with standardization (interaction)."""
    rng = np.random.default_rng(0)
    rows = []
    for bn, relu, std in itertools.product((False, True), repeat=3):
        for seed in range(seeds):
            loss = 2.3 - 1.0 * bn - 1.5 * (relu and std) + 0.05 * rng.standard_normal()
            diverged = relu and not std and seed < 2  # half the ReLU runs on raw inputs diverge
            rows.append(
                {
                    "factors.batchnorm": bn,
                    "factors.relu_he": relu,
                    "factors.standardize": std,
                    "seed": seed,
                    "final_val_loss": np.nan if diverged else loss,
                    "diverged": diverged,
                }
            )
    return pd.DataFrame(rows)


def test_effects_section_answers_which_practice_helps_and_which_need_each_other():
    section = effects_section(factorial_summary(), n_boot=500)
    text = "\n".join(section.lines)
    assert "batch norm lowers the final validation loss by 1 [" in text
    # ReLU helps only with standardized inputs: an interaction of -1.5 nats.
    assert (
        "ReLU with He init and standardized inputs: together they lower the final validation loss by 1.5"
        in text
    )
    assert "ReLU with He init raises the share of diverged runs by 0.25" in text
    assert set(section.figures) == {"effects"}


def test_no_study_sections_for_a_plain_sweep():
    plain = pd.DataFrame({"model.depth": [2, 8], "final_val_loss": [1.0, 2.0], "diverged": [False, False]})
    assert sections(plain) == []


def test_trainability_section_draws_the_grid_and_counts_agreement_with_theory():
    rows = []
    for depth, w2 in itertools.product((10, 20, 40, 80), (0.5, 1.0, 1.76, 2.5, 4.0)):
        inside = depth <= trainable_depth(Activation.tanh, w2, 0.05)
        rows.append(
            {
                "model.depth": depth,
                "model.init_gain": w2**0.5,
                "model.activation": "tanh",
                "model.width": 64,
                "model.init": "lecun_normal",
                "model.bias_std": 0.05**0.5,
                "train/loss": 0.1 if inside else 2.3,
                "outcome": "completed",
            }
        )
    section = trainability_section(pd.DataFrame(rows))
    assert "agree on 20 of 20 cells" in "\n".join(section.lines)
    assert section.figures["trainability"].axes[0].get_ylabel() == "depth (hidden layers)"


@pytest.mark.parametrize("missing", ["model.depth", "model.init_gain"])
def test_trainability_needs_both_axes(missing):
    frame = pd.DataFrame({"model.depth": [10, 20, 40], "model.init_gain": [1.0, 1.2, 1.4]}).drop(
        columns=missing
    )
    assert trainability_section(frame) is None


@pytest.mark.slow
def test_a_factorial_sweep_is_reported_with_its_effects(tmp_path):
    """A real 2×2 factorial sweep × 2 seeds (batch norm, Adam) into a store: the report gives effects."""
    import subprocess

    from conftest import cli, cli_env

    from bpexp.report import build_report

    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "-m",
        "+experiment/practice/batchnorm=off,on",
        "+experiment/practice/adam=off,on",
        "seed=0,1",
        "optim=sgd",
        "model.depth=3",
        "model.width=16",
        "train.steps=30",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    done = subprocess.run(
        cli(*args), cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = build_report("latest", tracking_uri=store, out_dir=tmp_path / "reports", log=False)
    text = report.markdown.read_text()
    assert "## Effects" in text and "2 factors, 4 cells, 8 runs" in text
    assert "- batch norm " in text and "- Adam " in text and "Adam and batch norm: together they" in text
    assert report.figures["effects"].stat().st_size > 0
