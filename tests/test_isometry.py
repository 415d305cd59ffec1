"""isometry.py: the closed forms of Pennington et al. 2017, and the predictions against spectra measured
(instruments.jacobian_spectrum, float64) on random nets of width 256 and depth 8 at initialization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bpexp import instruments, isometry, theory
from bpexp.config import Activation, Init, ModelConfig
from bpexp.model import build_mlp

WIDTH, DEPTH = 256, 8


@pytest.mark.parametrize("depth", [1, 8, 30])
def test_closed_forms_linear_and_relu(depth):
    """Linear nets: spread L (Gaussian) and 0 (orthogonal); ReLU at σ_w² = 2: 2L and L; m1 = 1 for all."""
    cases = [
        (Activation.identity, Init.lecun_normal, 1.0, depth),
        (Activation.identity, Init.orthogonal, 1.0, 0.0),
        (Activation.relu, Init.kaiming_normal, 1.0, 2 * depth),
        (Activation.relu, Init.orthogonal, math.sqrt(2), depth),
    ]
    for activation, init, gain, spread in cases:
        cfg = ModelConfig(depth=depth, width=WIDTH, activation=activation, init=init, init_gain=gain)
        prediction = isometry.predict_jacobian(cfg, WIDTH, 10)
        assert prediction.sv2_nvar == pytest.approx(spread, abs=1e-12)
        assert prediction.sv2_mean == pytest.approx(1.0, rel=1e-12)


def test_derivative_moments_match_quadrature_and_closed_forms():
    assert isometry.derivative_moment(Activation.relu, 0.7, 2) == 0.5
    # tanh: μ1 is theory.py's E[f'²]; μ2 by the same quadrature, and both → 1 as q → 0 (f'(0) = 1)
    assert isometry.derivative_moment(Activation.tanh, 0.3, 1) == pytest.approx(
        theory.mean_sq_f_prime(Activation.tanh, 0.3), rel=1e-12
    )
    assert isometry.derivative_moment(Activation.tanh, 1e-8, 2) == pytest.approx(1.0, abs=1e-6)
    assert isometry.weight_spread(False, 100, 50) == 0.5 and isometry.weight_spread(True, 50, 100) == 1.0


def test_unsupported_configs_predict_nothing():
    assert isometry.predict_jacobian(ModelConfig(depth=0), 8, 2) is None
    assert isometry.predict_jacobian(ModelConfig(residual=True), 8, 2) is None


def measured(cfg: ModelConfig, seeds: int = 4, inputs: int = 4) -> np.ndarray:
    """(sv2_mean, sv2_nvar) averaged over seeds, each over `inputs` standard Gaussian inputs."""
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build_mlp(cfg, WIDTH, 10).double()
        x = torch.randn(inputs, WIDTH, dtype=torch.float64)
        spectrum = instruments.jacobian_spectrum(
            [lin.weight for lin in model.linears], [lin.bias for lin in model.linears], cfg.activation, x
        )
        rows.append((spectrum.sv2_mean.item(), spectrum.sv2_nvar.item()))
    return np.mean(rows, axis=0)


TANH_B2 = 0.05
TANH_GAIN = math.sqrt(theory.edge_of_chaos(Activation.tanh, TANH_B2))  # σ_w at criticality for σ_b² = 0.05


@pytest.mark.parametrize(
    ("activation", "gain", "bias_std"),
    [
        (Activation.identity, 1.0, 0.0),
        (Activation.relu, math.sqrt(2), 0.0),
        (Activation.tanh, TANH_GAIN, 0.05**0.5),
    ],
)
def test_prediction_matches_measured_spectra_gaussian_vs_orthogonal(activation, gain, bias_std):
    """Tolerances: 10% on the spread, 20% on m1 (measured worst cases at this size: 5% and 9%; m1 is a
    product of per-layer norms and swings more). Gaussian and orthogonal predictions differ by ≥ 50%, so a
    swapped s1, or a spread off by one per layer, fails."""
    predictions = {}
    for init in (Init.lecun_normal, Init.orthogonal):
        cfg = ModelConfig(
            depth=DEPTH, width=WIDTH, activation=activation, init=init, init_gain=gain, bias_std=bias_std
        )
        predictions[init] = prediction = isometry.predict_jacobian(cfg, WIDTH, 10)
        m1, spread = measured(cfg)
        assert m1 == pytest.approx(prediction.sv2_mean, rel=0.2)
        assert spread == pytest.approx(prediction.sv2_nvar, rel=0.1, abs=1e-9)
    gaussian, orthogonal = predictions[Init.lecun_normal].sv2_nvar, predictions[Init.orthogonal].sv2_nvar
    assert gaussian - orthogonal == pytest.approx(DEPTH)  # s1 = −1 against s1 = 0, once per layer
    assert gaussian > 1.5 * orthogonal
