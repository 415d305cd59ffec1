"""theory.py: closed forms, quadrature accuracy, fixed points, init variances, and the predictions against
δ measured by autograd on wide nets at initialization (float64, mean over seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from bpexp import theory
from bpexp.config import Activation, Init, ModelConfig, Norm
from bpexp.model import build_mlp

# ---------------------------------------------------------------------------------------------------------
# Closed forms and quadrature
# ---------------------------------------------------------------------------------------------------------
QS = [1e-4, 0.01, 0.3, 1.0, 4.0, 30.0, 1e3]


def hermite_mean(g, q: float, n: int = 150) -> float:
    """E_z[g(√q z)] by plain Gauss–Hermite: exact for polynomials, converged for smooth g at q ≤ 1."""
    z, w = hermegauss(n)
    return float(w @ g(math.sqrt(q) * z) / math.sqrt(2 * math.pi))


def gaussian_half_mean(c: float, q: float) -> float:
    """E[e^{c y} 1{y < 0}] for y ~ N(0, q): e^{c²q/2} Φ(−c√q)."""
    return math.exp(c * c * q / 2) * 0.5 * math.erfc(c * math.sqrt(q) / math.sqrt(2))


@pytest.mark.parametrize("q", QS)
def test_homogeneous_closed_forms_match_quadrature(q):
    assert theory.mean_sq_f(Activation.relu, q) == pytest.approx(q / 2, rel=1e-9)
    assert theory.mean_sq_f_prime(Activation.relu, q) == pytest.approx(0.5, rel=1e-9)
    assert theory.mean_sq_f(Activation.identity, q) == pytest.approx(q, rel=1e-9)
    assert theory.mean_sq_f_prime(Activation.identity, q) == pytest.approx(1.0, rel=1e-9)
    c = (1 + 0.01**2) / 2
    assert theory.mean_sq_f(Activation.leaky_relu, q) == pytest.approx(c * q, rel=1e-9)
    assert theory.mean_sq_f_prime(Activation.leaky_relu, q) == pytest.approx(c, rel=1e-9)
    # and the maps themselves use the closed forms
    for w2, b2 in [(0.7, 0.0), (2.0, 0.05), (3.0, 1.0)]:
        assert theory.length_map(Activation.relu, q, w2, b2) == pytest.approx(w2 * q / 2 + b2, rel=1e-12)
        assert theory.length_map(Activation.identity, q, w2, b2) == pytest.approx(w2 * q + b2, rel=1e-12)
        assert theory.chi1(Activation.relu, q, w2) == pytest.approx(w2 / 2, rel=1e-12)  # q-independent
        assert theory.chi1(Activation.identity, q, w2) == pytest.approx(w2, rel=1e-12)


@pytest.mark.parametrize("q", QS[:-1])
def test_elu_quadrature_matches_closed_form(q):
    """elu' has a kink at 0 where Gauss–Hermite with 200 nodes is off by ~2e-3; the half-line rule is not."""
    e2, e1 = gaussian_half_mean(2.0, q), gaussian_half_mean(1.0, q)
    assert theory.mean_sq_f_prime(Activation.elu, q) == pytest.approx(0.5 + e2, rel=1e-9)
    assert theory.mean_sq_f(Activation.elu, q) == pytest.approx(q / 2 + e2 - 2 * e1 + 0.5, rel=1e-9)


@pytest.mark.parametrize("act", [Activation.tanh, Activation.sigmoid, Activation.gelu, Activation.softplus])
@pytest.mark.parametrize("q", [1e-3, 0.1, 0.5, 1.0])
def test_smooth_activations_match_gauss_hermite(act, q):
    f, f_prime = theory.ACTIVATIONS[act]
    assert theory.mean_sq_f(act, q) == pytest.approx(
        hermite_mean(lambda y: f(y) ** 2, q), rel=1e-9, abs=1e-14
    )
    assert theory.mean_sq_f_prime(act, q) == pytest.approx(
        hermite_mean(lambda y: f_prime(y) ** 2, q), rel=1e-9
    )


def test_tanh_quadrature_at_large_q_matches_the_asymptote():
    # E[tanh'(√q z)²] → φ(0)/√q · ∫ sech⁴ = (4/3)/√(2πq) as q → ∞ (corrections O(1/q)); Gauss–Hermite
    # with 200 nodes misses this by ~50% at q = 1e4.
    q = 1e4
    assert theory.mean_sq_f_prime(Activation.tanh, q) == pytest.approx(
        4 / 3 / math.sqrt(2 * math.pi * q), rel=1e-3
    )
    # E[tanh²] = 1 − E[sech²] → 1 − φ(0)/√q · ∫ sech² = 1 − 2/√(2πq)
    assert theory.mean_sq_f(Activation.tanh, q) == pytest.approx(1 - 2 / math.sqrt(2 * math.pi * q), rel=1e-6)


def test_sanity_of_sigmoid_and_tanh():
    assert theory.mean_sq_f(Activation.sigmoid, 0.0) == pytest.approx(0.25)  # σ(0)² at q = 0
    assert theory.chi1(Activation.sigmoid, 0.0, 1.0) == pytest.approx(1 / 16)  # σ'(0)² = 1/16
    assert theory.chi1(Activation.tanh, 0.0, 1.7) == pytest.approx(1.7)  # tanh'(0) = 1
    assert theory.mean_sq_f(Activation.tanh, 1e-6) == pytest.approx(1e-6, rel=1e-5)  # tanh(y) ≈ y
    # tanh² < y² and tanh'² < 1 for y ≠ 0, and both saturate
    for q in [0.1, 1.0, 10.0]:
        assert theory.mean_sq_f(Activation.tanh, q) < q
        assert theory.mean_sq_f_prime(Activation.tanh, q) < 1.0
    assert theory.mean_sq_f(Activation.tanh, 1e6) == pytest.approx(1.0, abs=1e-2)


# ---------------------------------------------------------------------------------------------------------
# Fixed points, χ1, depth scale, edge of chaos
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w2", [0.3, 0.5, 0.9, 1.0])
def test_tanh_without_bias_in_the_ordered_phase_collapses_to_zero(w2):
    q_star = theory.fixed_point(Activation.tanh, w2, 0.0, q0=1.0)
    assert q_star == 0.0
    assert theory.chi1(Activation.tanh, q_star, w2) == pytest.approx(w2, rel=1e-12)
    assert theory.depth_scale(theory.chi1(Activation.tanh, q_star, w2)) == (
        math.inf if w2 == 1.0 else -1 / math.log(w2)
    )


@pytest.mark.parametrize(
    ("act", "w2", "b2"),
    [
        (Activation.tanh, 1.5, 0.0),
        (Activation.tanh, 2.0, 0.05),
        (Activation.tanh, 0.5, 0.05),
        (Activation.sigmoid, 4.0, 0.0),
        (Activation.elu, 1.0, 0.1),
        (Activation.gelu, 1.0, 0.1),
        (Activation.softplus, 0.5, 0.0),
    ],
)
def test_fixed_point_is_the_limit_of_iterating_the_map(act, w2, b2):
    q = 1.0
    for _ in range(3000):
        q = theory.length_map(act, q, w2, b2)
    q_star = theory.fixed_point(act, w2, b2, q0=1.0)
    assert q_star == pytest.approx(q, rel=1e-8, abs=1e-12)
    assert theory.length_map(act, q_star, w2, b2) == pytest.approx(q_star, rel=1e-10)


def test_selu_with_lecun_init_is_self_normalizing():
    # Klambauer et al. 2017: with σ_w² = 1 and zero bias, unit variance (q = 1) is the fixed point.
    for q0 in (0.2, 1.0, 5.0):
        assert theory.fixed_point(Activation.selu, 1.0, 0.0, q0=q0) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    ("w2", "b2", "q0", "expected"),
    [
        (1.0, 0.0, 0.7, 0.0),
        (1.0, 0.3, 0.7, 0.6),
        (2.0, 0.0, 0.7, 0.7),
        (2.0, 0.1, 0.7, math.inf),
        (3.0, 0.0, 0.7, math.inf),
    ],
)
def test_relu_fixed_point_is_zero_finite_or_inf(w2, b2, q0, expected):
    assert theory.fixed_point(Activation.relu, w2, b2, q0=q0) == pytest.approx(expected)
    assert theory.chi1(Activation.relu, theory.fixed_point(Activation.relu, w2, b2, q0), w2) == pytest.approx(
        w2 / 2
    )


def test_edge_of_chaos():
    assert theory.edge_of_chaos(Activation.tanh, 0.0) == pytest.approx(1.0, abs=1e-6)
    # Schoenholz et al. 2017, Fig. 1: the tanh critical line passes σ_w² ≈ 1.76 at σ_b² = 0.05
    w2 = theory.edge_of_chaos(Activation.tanh, 0.05)
    assert w2 == pytest.approx(1.76, abs=0.01)
    q_star = theory.fixed_point(Activation.tanh, w2, 0.05)
    assert theory.chi1(Activation.tanh, q_star, w2) == pytest.approx(1.0, abs=1e-9)
    assert theory.edge_of_chaos(Activation.relu, 0.05) == 2.0


# ---------------------------------------------------------------------------------------------------------
# Init variances: exactly what bpexp.model draws
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", list(Init))
def test_init_variances_match_the_drawn_weights(init):
    cfg = ModelConfig(depth=2, width=384, init=init, init_gain=1.3, init_std=0.05, bias_std=0.2)
    in_dim, out_dim = 192, 8
    torch.manual_seed(0)
    model = build_mlp(cfg, in_dim, out_dim)
    sigma_w2, sigma_b2 = theory.init_variances(cfg, in_dim, out_dim)
    for l, linear in enumerate(model.linears, start=1):
        w = linear.weight.detach().double()
        fan_in = w.shape[1]
        drawn_w2 = fan_in * w.pow(2).mean().item()
        assert drawn_w2 == pytest.approx(sigma_w2[l - 1], rel=0.05), f"layer {l}, {init.value}"
        b = linear.bias.detach().double()
        if l < 3:  # the output layer has only 8 biases
            assert b.pow(2).mean().item() == pytest.approx(sigma_b2[l - 1], rel=0.3), (
                f"bias {l}, {init.value}"
            )


def test_default_init_is_pytorchs_and_xavier_output_layer_differs():
    cfg = ModelConfig(depth=3, width=100, init=Init.default, bias_std=0.5)
    w2, b2 = theory.init_variances(cfg, 10, 1)
    assert w2 == pytest.approx((1 / 3,) * 4)
    assert b2 == pytest.approx((1 / 30, 1 / 300, 1 / 300, 1 / 300))  # bias_std ignored: PyTorch's bias kept
    cfg = ModelConfig(depth=3, width=100, init=Init.xavier_normal, init_gain=1.0)
    w2, _ = theory.init_variances(cfg, 100, 1)
    assert w2 == pytest.approx((1.0, 1.0, 1.0, 200 / 101))


# ---------------------------------------------------------------------------------------------------------
# predict(): shape, None where it does not apply, finite params/metrics
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(depth=5, norm=Norm.batchnorm),
        ModelConfig(depth=5, norm=Norm.layernorm),
        ModelConfig(depth=5, residual=True),
        ModelConfig(depth=5, dropout=0.1),
    ],
    ids=["batchnorm", "layernorm", "residual", "dropout"],
)
def test_no_prediction_where_the_assumptions_fail(cfg):
    assert theory.predict(cfg, 16, 4) is None


def test_prediction_shapes_and_logged_values():
    cfg = ModelConfig(depth=6, width=64, activation=Activation.relu, init=Init.kaiming_normal)
    p = theory.predict(cfg, 16, 4)
    assert p is not None
    assert len(p.delta_log10) == 7 and len(p.q) == len(p.chi1_per_layer) == len(p.a_second_moment) == 6
    assert p.delta_log10[-1] == 0.0 and p.delta_log10[0] == p.delta_log10_ratio
    assert p.chi1 == pytest.approx(1.0)
    assert p.depth_scale == math.inf  # Kaiming ReLU: the edge of chaos
    assert set(p.params()) == {"theory.chi1", "theory.q_star"}  # inf depth scale left out
    assert set(p.metrics()) == {"theory/delta_log10_ratio", "theory/delta_slope"}
    assert all(math.isfinite(v) for v in [*p.params().values(), *p.metrics().values()])
    # forward: ReLU with Kaiming keeps q constant, E‖a‖²/n = q/2
    assert p.q == pytest.approx((2 * 16 / 16,) * 6)  # q^(1) = σ_w² · mean(x²) with mean(x²) = 1
    assert p.a_second_moment == pytest.approx((1.0,) * 6)
    lecun = theory.predict(
        ModelConfig(depth=6, width=64, activation=Activation.relu, init=Init.lecun_normal), 16, 4
    )
    assert lecun.delta_log10_ratio == pytest.approx(6 / 2 * math.log10(0.5))
    assert lecun.delta_slope == pytest.approx(-0.5 * math.log10(0.5))
    assert lecun.depth_scale == pytest.approx(1 / math.log(2))
    assert set(lecun.params()) == {"theory.chi1", "theory.q_star", "theory.depth_scale"}


def test_single_layer_net():
    p = theory.predict(ModelConfig(depth=0, activation=Activation.tanh), 8, 2)
    assert p.delta_log10 == (0.0,) and p.delta_log10_ratio == 0.0 and p.delta_slope == 0.0 and p.q == ()


# ---------------------------------------------------------------------------------------------------------
# Measured vs predicted at initialization
# ---------------------------------------------------------------------------------------------------------
WIDTH, DEPTH, BATCH, SEEDS = 256, 30, 64, (0, 1, 2)


def measured_delta_log10(cfg: ModelConfig, seeds=SEEDS) -> np.ndarray:
    """Mean over seeds of log10‖δ^(l)‖_F − log10‖δ^(L)‖_F, l = 1 … L, δ^(l) = ∂L/∂z^(l) (batch × width),
    x ~ N(0, I) with in_dim = width, y ~ N(0, 1), MSE loss; float64 throughout."""
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_mlp(cfg, cfg.width, 1).double()
        x = torch.randn(BATCH, cfg.width, dtype=torch.float64)
        y = torch.randn(BATCH, 1, dtype=torch.float64)
        out, zs, _ = model.trace(x)
        torch.nn.functional.mse_loss(out, y).backward()
        norms = np.array([z.grad.norm().item() for z in zs])
        rows.append(np.log10(norms) - np.log10(norms[-1]))
    return np.mean(rows, axis=0)


@pytest.mark.parametrize("w2", [0.5, 1.0, 2.0])
def test_tanh_delta_ratio_matches_the_trajectory_prediction(w2):
    """Measured at width 256, depth 30: −4.70, −0.78, +0.49 against predicted −4.72, −0.81, +0.47.

    At σ_w² = 1 the fixed point alone (q* = 0, χ1 = 1) would predict 0, 0.8 decades off; the trajectory
    q^(l) ≈ 1/(2l) gives χ1(q^(l)) ≈ 1 − 1/l and δ^(1)/δ^(L) ≈ 1/√30. The ±0.15 tolerance catches that,
    and any error in σ_w² of ±10% (which moves the ratio by ≥ 0.3 decades at depth 30)."""
    cfg = ModelConfig(
        depth=DEPTH, width=WIDTH, activation=Activation.tanh, init=Init.lecun_normal, init_gain=math.sqrt(w2)
    )
    p = theory.predict(cfg, WIDTH, 1)
    measured = measured_delta_log10(cfg)
    assert measured[0] == pytest.approx(p.delta_log10_ratio, abs=0.15)
    assert theory.slope_per_layer(measured) == pytest.approx(p.delta_slope, abs=0.15 / DEPTH)
    if w2 == 1.0:
        fixed_point_only = DEPTH / 2 * math.log10(p.chi1)  # = 0
        assert abs(measured[0] - fixed_point_only) > 0.5
    if w2 == 2.0:  # the chaotic phase: δ grows toward the input
        assert measured[0] > 0.3


@pytest.mark.parametrize(
    ("init", "expected"), [(Init.kaiming_normal, 0.0), (Init.lecun_normal, DEPTH / 2 * math.log10(0.5))]
)
def test_relu_delta_ratio_kaiming_vs_lecun(init, expected):
    """He et al. 2015: χ1 = σ_w²/2 at every layer, so Kaiming (σ_w² = 2) keeps δ flat and LeCun (σ_w² = 1)
    halves ‖δ‖² per layer: (L−1)/2·log10(½) = −4.5 decades over 30 layers. Measured: −0.04 and −4.55."""
    cfg = ModelConfig(depth=DEPTH, width=WIDTH, activation=Activation.relu, init=init)
    p = theory.predict(cfg, WIDTH, 1)
    assert p.delta_log10_ratio == pytest.approx(expected, abs=1e-9)
    measured = measured_delta_log10(cfg)
    # ±0.6: ReLU nets fluctuate most from seed to seed (log-normal, variance ∝ depth/width; measured sd
    # 0.1 per seed here); the two inits are 4.5 decades apart.
    assert measured[0] == pytest.approx(expected, abs=0.6)
    assert measured[0] == pytest.approx(p.delta_log10_ratio, abs=0.6)
