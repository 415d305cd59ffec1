"""The report's sections for the instruments' studies, on hand-made summaries whose answers are known."""

import numpy as np
import pandas as pd

from bpexp.studies import edge_of_stability_section, isometry_section, sections


def isometry_summary() -> pd.DataFrame:
    """Gaussian linear nets: spread = depth (measured 10% high); orthogonal ones: 0."""
    rows = []
    for init in ("lecun_normal", "orthogonal"):
        for depth in (4, 8, 16):
            theory = float(depth) if init == "lecun_normal" else 0.0
            rows.append(
                {
                    "run_id": f"{init}-{depth}",
                    "model.activation": "identity",
                    "model.init": init,
                    "model.depth": depth,
                    "jacobian/sv2_nvar": 1.1 * theory,
                    "theory/jacobian_sv2_nvar": theory,
                }
            )
    return pd.DataFrame(rows)


def test_isometry_section_tabulates_the_deepest_nets_against_theory():
    section = isometry_section(isometry_summary())
    assert section.title == "Dynamical isometry" and set(section.figures) == {"isometry"}
    assert "| identity | lecun_normal | 16 | 17.6 | 16 |" in section.lines
    assert "| identity | orthogonal | 16 | 0 | 0 |" in section.lines
    assert isometry_section(isometry_summary().drop(columns="jacobian/sv2_nvar")) is None


def test_edge_of_stability_section_reads_sharpness_against_two_over_lr():
    summary = pd.DataFrame({"run_id": ["a", "b"], "optim.lr": [0.5, 1.0]})
    steps = np.arange(0, 100, 10)
    rising = np.minimum(0.5 + steps / 20, 2.0)  # η = 1: reaches 2/η = 2 and stays
    below = 0.5 + steps / 100  # η = 0.5: stays under 2/η = 4
    dynamics = pd.DataFrame(
        {
            "run_id": ["a"] * 10 + ["b"] * 10,
            "step": np.concatenate([steps, steps]),
            "quantity": "sharpness/top",
            "value": np.concatenate([below, rising]),
        }
    )
    section = edge_of_stability_section(summary, dynamics)
    assert "| 1 | 2 | 2 | 2 | 1.00 |" in section.lines
    assert "| 0.5 | 4 | 1.4 | 1.2 | 0.30 |" in section.lines
    assert edge_of_stability_section(summary, dynamics.assign(quantity="val/loss")) is None
    assert [s.title for s in sections(summary, dynamics)] == ["Edge of stability"]
