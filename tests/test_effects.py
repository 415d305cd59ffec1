"""Effects of factors on hand-made tables whose effects are known exactly."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from bpexp.effects import coded, effects, sentence, steps_to_threshold

LEVELS = {"a": ("off", "on"), "b": (0, 1), "c": ("x", "y")}


def table(value, seeds=3, noise=0.0, drop=()):
    """Every cell of a 2×2×2 design with `seeds` runs; value(a, b, c) with a, b, c in {0, 1}."""
    rng = np.random.default_rng(1)
    rows = []
    for a, b, c in itertools.product((0, 1), repeat=3):
        for s in range(seeds):
            if (a, b, c) in drop:
                continue
            y = value(a, b, c) + noise * rng.standard_normal()
            rows.append({"a": ("off", "on")[a], "b": b, "c": ("x", "y")[c], "seed": s, "y": y})
    return pd.DataFrame(rows)


def by_term(frame):
    return frame.set_index("term")


def test_main_effects_and_interaction_are_exact_without_noise():
    # y = 3 + 2a + 1b + 0.5ab - 4c: A's effect averaged over B is 2 + 0.5/2, the A×B interaction is
    # (effect of A with b=1) - (effect of A with b=0) = 0.5, C's is -4 and nothing else interacts.
    out = by_term(effects(table(lambda a, b, c: 3 + 2 * a + b + 0.5 * a * b - 4 * c), LEVELS, "y"))
    assert out.loc["a", "effect"] == pytest.approx(2.25)
    assert out.loc["b", "effect"] == pytest.approx(1.25)
    assert out.loc["c", "effect"] == pytest.approx(-4.0)
    assert out.loc["a × b", "effect"] == pytest.approx(0.5)
    assert out.loc["a × c", "effect"] == pytest.approx(0.0, abs=1e-12)
    assert out.loc["b × c", "effect"] == pytest.approx(0.0, abs=1e-12)
    # No spread across seeds: the bootstrap interval collapses onto the effect.
    assert out.loc["a", "lo"] == pytest.approx(2.25) and out.loc["a", "hi"] == pytest.approx(2.25)
    assert out.loc["a", "n_cells"] == 8 and out.loc["a", "n_runs"] == 24
    assert out.loc["c", "low_mean"] - out.loc["c", "high_mean"] == pytest.approx(4.0)


def test_interval_covers_the_true_effect_and_shrinks_with_seeds():
    def truth(a, b, c):
        return 1.0 * a - 0.5 * b

    few = by_term(effects(table(truth, seeds=4, noise=0.3), LEVELS, "y", n_boot=2000))
    many = by_term(effects(table(truth, seeds=40, noise=0.3), LEVELS, "y", n_boot=2000))
    for out in (few, many):
        assert out.loc["a", "lo"] < 1.0 < out.loc["a", "hi"]
        assert out.loc["b", "lo"] < -0.5 < out.loc["b", "hi"]
    width = lambda out: out.loc["a", "hi"] - out.loc["a", "lo"]  # noqa: E731
    assert width(many) < 0.5 * width(few)
    assert many.loc["a", "lo"] > 0.8  # 40 seeds separate the effect from zero


def test_cells_weigh_equally_and_missing_cells_or_nan_runs_are_left_out():
    # One cell with 10 seeds, the others with 1: cell means, not run means, are contrasted.
    frame = table(lambda a, b, c: 5.0 * a, seeds=1)
    heavy = frame[(frame["a"] == "on") & (frame["b"] == 1) & (frame["c"] == "y")]
    frame = pd.concat([frame, *[heavy] * 9], ignore_index=True)
    frame.loc[len(frame)] = {"a": "off", "b": 0, "c": "x", "seed": 9, "y": math.nan}  # a diverged run
    out = by_term(effects(frame, LEVELS, "y"))
    assert out.loc["a", "effect"] == pytest.approx(5.0)
    # A half fraction (the cells with a+b+c even) still estimates the main effects it has.
    half = table(lambda a, b, c: 2.0 * b, drop={k for k in itertools.product((0, 1), repeat=3) if sum(k) % 2})
    out = by_term(effects(half, LEVELS, "y", interactions=False))
    assert out.loc["b", "effect"] == pytest.approx(2.0) and out.loc["b", "n_cells"] == 4


def test_a_level_outside_the_design_fails_naming_the_factor():
    frame = table(lambda a, b, c: 0.0)
    frame.loc[0, "a"] = "maybe"
    with pytest.raises(ValueError, match=r"factor 'a' has levels \['maybe'\]"):
        coded(frame, LEVELS)


def test_sentences_say_direction_size_and_interval():
    row = {"factors": ("model.norm",), "effect": -1.2, "lo": -1.5, "hi": -0.9}
    text = sentence(row, "the final validation loss", "nats", {"model.norm": "batchnorm"})
    assert text == (
        "batchnorm lowers the final validation loss by 1.2 [0.9, 1.5] nats"
        " on average over the other practices"
    )
    row = {"factors": ("a", "b"), "effect": 0.3, "lo": -0.1, "hi": 0.7}
    assert sentence(row, "the loss") == (
        "a and b: together they raise the loss by 0.3 (95% CI -0.1 to +0.7 includes no effect)"
        " more than their separate effects add up to"
    )


def test_steps_to_threshold_per_run():
    dynamics = pd.DataFrame(
        {
            "run_id": ["r1"] * 4 + ["r2"] * 2,
            "step": [0, 10, 20, 30, 0, 10],
            "layer": pd.array([pd.NA] * 6, dtype="Int64"),
            "quantity": ["val/loss"] * 6,
            "value": [2.0, 1.0, 0.4, 0.2, 2.0, 1.5],
        }
    )
    found = steps_to_threshold(dynamics, "val/loss", 0.5)
    assert found["r1"] == 20 and math.isnan(found["r2"])
