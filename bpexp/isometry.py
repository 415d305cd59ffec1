"""Free-probability predictions for the spectrum of the input-output Jacobian at initialization.

Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning through dynamical
isometry: theory and practice". J = ∂a^(L-1)/∂x = D_{L-1}W_{L-1} … D_1W_1 (readout left out), with
D_l = diag f'(z^(l)). As width → ∞ the factors are asymptotically free, so the S-transform of JJᵀ is the
product of those of the D_l² and the W_lW_lᵀ. To first order in z, a spectrum with moments m1, m2 has

    S(z) = (1/m1)·(1 − v·z + O(z²)),   v = m2/m1² − 1   (its scale-free spread),

so products multiply the 1/m1 and add the v's:

    m1(JJᵀ) = Π_l σ_w²^(l) μ1^(l),        v(JJᵀ) = Σ_l (μ2^(l)/μ1^(l)² − 1 + v_W^(l)),

with μk^(l) = E[f'(z^(l))^(2k)] for z^(l) ~ N(0, q^(l)), and v_W the spread of W_lW_lᵀ: 1 for a square
Gaussian (any iid) matrix (Marchenko–Pastur, the paper's s1 = −1), 0 for an orthogonal one (s1 = 0). At
the fixed point q* these are the paper's m1 = (σ_w²μ1)^L and σ²/m1² = L(μ2/μ1² − 1 − s1); linear nets give
L (Gaussian) and 0 (orthogonal), ReLU at σ_w² = 2 gives 2L and L. Here the μ's are taken along the q
trajectory of theory.py rather than at q*, as theory.predict does for δ (tanh near q* = 0 crawls).
Rectangular layers (the first, when in_dim ≠ width): v_W = n_out/n_in for iid entries; a semi-orthogonal
W with n_in < n_out has WWᵀ a scaled projection, v_W = n_out/n_in − 1 (0 when n_in ≥ n_out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

from bpexp.config import Activation, Init, ModelConfig
from bpexp.names import Metric
from bpexp.theory import ACTIVATIONS, HOMOGENEOUS, LEAKY_SLOPE, gaussian_mean, init_variances, q_trajectory
from bpexp.theory import unsupported as mean_field_unsupported


def derivative_moment(activation: Activation, q: float, k: int) -> float:
    """μk = E[f'(√q z)^(2k)], z ~ N(0, 1); closed forms for identity (1), relu (½), leaky_relu."""
    if activation in HOMOGENEOUS:
        slope = {Activation.identity: 1.0, Activation.relu: 0.0, Activation.leaky_relu: LEAKY_SLOPE}[
            activation
        ]
        return 1.0 if activation == Activation.identity else (1.0 + slope ** (2 * k)) / 2
    _, f_prime = ACTIVATIONS[activation]
    return gaussian_mean(lambda y: f_prime(y) ** (2 * k), q)


def weight_spread(orthogonal: bool, fan_in: int, fan_out: int) -> float:
    """v_W = m2/m1² − 1 of W Wᵀ (fan_out × fan_out) as width → ∞ with fan_out/fan_in fixed."""
    ratio = fan_out / fan_in
    if orthogonal:
        return max(ratio - 1.0, 0.0)
    return ratio  # Marchenko–Pastur: m2/m1² = 1 + ratio, whatever the iid entries' distribution


def spectrum_moments(
    activation: Activation,
    q: list[float] | tuple[float, ...],
    sigma_w2: list[float] | tuple[float, ...],
    weight_spreads: list[float] | tuple[float, ...],
) -> tuple[float, float]:
    """(m1, v) of JJᵀ for hidden layers with pre-activation second moments q^(l), weight second moments
    σ_w²^(l) and weight spreads v_W^(l), l = 1 … L−1 (see the module docstring)."""
    m1, spread = 1.0, 0.0
    for q_l, w2, v_w in zip(q, sigma_w2, weight_spreads, strict=True):
        mu1, mu2 = derivative_moment(activation, q_l, 1), derivative_moment(activation, q_l, 2)
        m1 *= w2 * mu1
        spread += mu2 / mu1**2 - 1.0 + v_w
    return m1, spread


@dataclass(frozen=True)
class JacobianPrediction:
    sv2_mean: float
    """m1 of JJᵀ's eigenvalues: Π σ_w² μ1 (1 = the mean squared singular value neither grows nor shrinks)."""
    sv2_nvar: float
    """(m2 − m1²)/m1²: the scale-free spread (0 = dynamical isometry)."""

    def metrics(self) -> dict[str, float]:
        """Step-0 twins of jacobian/sv2_mean and jacobian/sv2_nvar (finite only)."""
        values = {
            Metric.theory_jacobian_sv2_mean: self.sv2_mean,
            Metric.theory_jacobian_sv2_nvar: self.sv2_nvar,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def predict_jacobian(
    cfg: ModelConfig, in_dim: int, out_dim: int, input_second_moment: float = 1.0
) -> JacobianPrediction | None:
    """The prediction for cfg at initialization, or None where it does not apply: no hidden layer, or
    normalization, residual connections or dropout (theory.unsupported)."""
    if cfg.depth < 1 or mean_field_unsupported(cfg) is not None:
        return None
    sigma_w2, sigma_b2 = init_variances(cfg, in_dim, out_dim)
    qs = q_trajectory(cfg.activation, sigma_w2, sigma_b2, input_second_moment, cfg.depth)
    fans = list(pairwise([in_dim] + [cfg.width] * cfg.depth))  # the hidden layers 1 … L−1
    spreads = [weight_spread(cfg.init == Init.orthogonal, n_in, n_out) for n_in, n_out in fans]
    m1, spread = spectrum_moments(cfg.activation, qs, sigma_w2[: cfg.depth], spreads)
    return JacobianPrediction(sv2_mean=m1, sv2_nvar=spread)
