"""Mean-field predictions of signal propagation through an MLP at initialization.

Over 400 lines: the quadrature, the length and gradient maps and the per-config prediction build on each
other and are checked together in tests/test_theory.py.

Poole et al. 2016 ("Exponential expressivity in deep neural networks through transient chaos"),
Schoenholz et al. 2017 ("Deep Information Propagation"), He et al. 2015, Glorot & Bengio 2010.
Weights W^(l) ~ N(0, σ_w²/fan_in), biases b^(l) ~ N(0, σ_b²), width → ∞: each pre-activation z_i^(l)
is Gaussian with second moment q^(l), and

    q^(1)   = σ_w² · mean_i(x_i²) + σ_b²                         (the input's second moment)
    q^(l+1) = σ_w² · E_z[f(√q^(l) z)²] + σ_b²,   z ~ N(0, 1)       (the length map)
    χ1(q)   = σ_w² · E_z[f'(√q z)²]                               (the backward gain per layer)
    E‖δ^(l)‖² = χ1(q^(l)) · E‖δ^(l+1)‖²,   l = L−1 … 1

The last line is δ^(l) = (W^(l+1)ᵀ δ^(l+1)) ⊙ f'(z^(l)): W^(l+1) has n_l columns of entries with variance
σ_w²/n_l, so E‖W^(l+1)ᵀ δ‖² = σ_w² ‖δ‖² and the width cancels. Everything here is numpy on floats: no
torch, no training code, no tracking. ``predict`` is the one entry point a run uses.

Traps this module is built around (each has bitten a measurement before):

* Predict δ, not ∂L/∂W. For one example ‖∂L/∂W^(l)‖ = ‖δ^(l)‖·‖a^(l−1)‖: when the forward signal shrinks at
  the rate the backward one does (ReLU under any Gaussian init, tanh with σ_b = 0 in the ordered phase,
  linear nets) the weight gradients look flat across layers while δ vanishes by decades. With a batch,
  ∂L/∂W^(l) = Σ_b δ_b a_bᵀ sums outer products, so its Frobenius norm has cross terms between examples;
  the batch × width matrix δ^(l) has none (its squared norm is the plain sum over examples), which is why
  the prediction is made for ‖δ^(l)‖_F.
* Use the trajectory, not only the fixed point. At the edge of chaos of tanh (σ_w² = 1, σ_b = 0) the fixed
  point is q* = 0 with χ1(q*) = 1, which predicts no vanishing at all; but q^(l) only decays like 1/(2l),
  χ1(q^(l)) ≈ 1 − 1/l, and the product over 30 layers is ≈ 1/30: δ^(1) is ~0.7 decades below δ^(L).
  ``predict`` multiplies χ1 along the actual q^(1) … q^(L−1); q*, χ1(q*) and the depth scale are reported
  beside it as the asymptotic summary.
* ReLU-like (positively homogeneous) activations have no finite nonzero fixed point unless σ_w²·c = 1
  (c = ½ for ReLU, so σ_w² = 2, He et al.): q* is 0 or inf, and χ1 = σ_w²·c whatever q is.
* The predictions are width → ∞ limits. At finite width n, q^(l) fluctuates by ~√(2/n) per layer; a
  contracting length map (tanh, sigmoid) forgets that, a near-neutral one accumulates it over depth. So
  where χ1 depends on q and the map is near-neutral for many layers (gelu or elu near Kaiming, softplus),
  a depth-30 net needs width ≫ 256 to match; measured at width 256, gelu with Kaiming init vanishes by
  −1.1 decades where −2.7 is predicted (width 1024 closes most of the gap). ReLU's χ1 does not depend
  on q, so its δ prediction is immune to this, but its seed-to-seed spread grows like depth/width.

Layers are numbered l = 1 … L as in docs/design.md (L = depth + 1 Linear layers; layer L is the linear output
layer, so δ^(L) is where backprop starts and every predicted δ norm is relative to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from bpexp.config import Activation, Init, ModelConfig, Norm

Array = np.ndarray

LEAKY_SLOPE = 0.01  # F.leaky_relu's default negative slope, as bpexp.model uses it
SELU_ALPHA = 1.6732632423543772848170429916717  # Klambauer et al. 2017, torch's constants
SELU_SCALE = 1.0507009873554804934193349852946
Q_MAX = 1e12  # a length map that climbs past this has no finite fixed point: q* = inf
CHI1_EDGE_TOL = 1e-9  # |ln χ1| below this counts as the edge of chaos (depth scale inf)

# ---------------------------------------------------------------------------------------------------------
# Gaussian expectations E_z[g(√q z)] by quadrature.
#
# Plain Gauss–Hermite (numpy.polynomial.hermite_e.hermegauss) is exact for polynomials but was measured
# to be too coarse here: with 200 nodes, E[elu'(z)²] is off by 2e-3 at q = 1 (elu' and selu' have a kink
# or a jump at z = 0, which no global polynomial resolves), E[tanh'(√q z)²] by 2e-4 at q = 10 and 3e-2 at
# q = 100 (the integrand's features have width 1/√q in z and fall between nodes), and hermegauss itself
# returns NaN weights beyond ~350 nodes. So the rule below is composite Gauss–Legendre on the two
# half-lines z ≷ 0 (the kink of relu/elu/selu is always at z = 0, whatever q), with panel breakpoints at
# 2^k/√q (k = −3 … 6) where the activation's own scale lives, on top of unit panels out to |z| = 11
# (the Gaussian tail beyond carries < 1e-26 of the mass). It agrees with closed forms and with a
# converged Gauss–Hermite rule (smooth integrands, q ≤ 1) to ~1e-13; see tests/test_theory.py.
# ---------------------------------------------------------------------------------------------------------
_Z_MAX = 11.0
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)
_UNIT_BREAKS = np.arange(0.0, _Z_MAX + 0.5, 0.5)
_SCALE_BREAKS = 2.0 ** np.arange(-3, 7)


def half_line_rule(q: float) -> tuple[Array, Array]:
    """Nodes t > 0 and weights w with Σ w·[g(√q t) + g(−√q t)] ≈ E_z[g(√q z)] (z ~ N(0, 1))."""
    scale = _SCALE_BREAKS / math.sqrt(q) if q > 0 else np.empty(0)
    breaks = np.unique(np.concatenate([_UNIT_BREAKS, scale[scale < _Z_MAX]]))
    lo, hi = breaks[:-1, None], breaks[1:, None]  # (panels, 1)
    t = (lo + hi) / 2 + (hi - lo) / 2 * _GL_NODES  # (panels, 16)
    w = (hi - lo) / 2 * _GL_WEIGHTS * np.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)
    return t.ravel(), w.ravel()


def gaussian_mean(g: Callable[[Array], Array], q: float) -> float:
    """E_z[g(√q z)], z ~ N(0, 1), for g vectorized over numpy arrays (piecewise smooth, kinks only at 0).

    q = 0 is read as the limit q → 0⁺, so a derivative that jumps at 0 (selu') averages its two sides.
    """
    q = max(float(q), 1e-300)
    t, w = half_line_rule(q)
    y = math.sqrt(q) * t
    return float(w @ (g(y) + g(-y)))


# ---------------------------------------------------------------------------------------------------------
# Activations f and their derivatives f', in numpy, matching bpexp.model.ACTIVATIONS.
# ---------------------------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[float])


def _sigmoid(y: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(y / 2))  # no overflow for large |y|


def _gelu_cdf(y: Array) -> Array:
    return 0.5 * (1.0 + _erf(y / math.sqrt(2)))


def _elu(y: Array) -> Array:
    return np.where(y > 0, y, np.expm1(np.minimum(y, 0.0)))


def _elu_prime(y: Array) -> Array:
    return np.where(y > 0, 1.0, np.exp(np.minimum(y, 0.0)))


def _gaussian_pdf(y: Array) -> Array:
    return np.exp(-(y**2) / 2) / math.sqrt(2 * math.pi)


ACTIVATIONS: dict[Activation, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    Activation.identity: (lambda y: y, np.ones_like),
    Activation.sigmoid: (_sigmoid, lambda y: _sigmoid(y) * _sigmoid(-y)),
    Activation.tanh: (np.tanh, lambda y: 1.0 - np.tanh(y) ** 2),
    Activation.relu: (lambda y: np.maximum(y, 0.0), lambda y: (y > 0).astype(float)),
    Activation.leaky_relu: (
        lambda y: np.where(y > 0, y, LEAKY_SLOPE * y),
        lambda y: np.where(y > 0, 1.0, LEAKY_SLOPE),
    ),
    Activation.elu: (_elu, _elu_prime),  # α = 1
    Activation.selu: (
        lambda y: SELU_SCALE * np.where(y > 0, y, SELU_ALPHA * np.expm1(np.minimum(y, 0.0))),
        lambda y: SELU_SCALE * np.where(y > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(y, 0.0))),
    ),
    Activation.gelu: (lambda y: y * _gelu_cdf(y), lambda y: _gelu_cdf(y) + y * _gaussian_pdf(y)),  # exact
    # torch's softplus switches to y above 20; the difference (< 3e-9) is far below what matters here.
    Activation.softplus: (lambda y: np.logaddexp(0.0, y), _sigmoid),
}

# Positively homogeneous activations: E[f(√q z)²] = c·q and E[f'(√q z)²] = c, with the same c.
HOMOGENEOUS: dict[Activation, float] = {
    Activation.identity: 1.0,
    Activation.relu: 0.5,
    Activation.leaky_relu: (1.0 + LEAKY_SLOPE**2) / 2,
}


def mean_sq_f(activation: Activation, q: float) -> float:
    """E_z[f(√q z)²] by quadrature: the second moment of a unit whose pre-activation has second moment q."""
    f, _ = ACTIVATIONS[activation]
    return gaussian_mean(lambda y: f(y) ** 2, q)


def mean_sq_f_prime(activation: Activation, q: float) -> float:
    """E_z[f'(√q z)²] by quadrature."""
    _, f_prime = ACTIVATIONS[activation]
    return gaussian_mean(lambda y: f_prime(y) ** 2, q)


def activation_second_moment(activation: Activation, q: float) -> float:
    """E‖a‖²/n = E_z[f(√q z)²]; closed form for identity/relu/leaky_relu (c·q), quadrature otherwise."""
    if activation in HOMOGENEOUS:
        return HOMOGENEOUS[activation] * q
    return mean_sq_f(activation, q)


def length_map(activation: Activation, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """q^(l+1) = σ_w² E_z[f(√q^(l) z)²] + σ_b² (identity: σ_w² q + σ_b²; relu: σ_w² q/2 + σ_b²)."""
    return sigma_w2 * activation_second_moment(activation, q) + sigma_b2


def chi1(activation: Activation, q: float, sigma_w2: float) -> float:
    """χ1(q) = σ_w² E_z[f'(√q z)²]: E‖δ^(l)‖² / E‖δ^(l+1)‖² at a layer whose z has second moment q.

    Closed form σ_w²·c for identity (c = 1), relu (½) and leaky_relu ((1 + 0.01²)/2), whatever q is.
    q may be inf (a diverging trajectory): χ1 is then its limit, evaluated at Q_MAX.
    """
    if activation in HOMOGENEOUS:
        return sigma_w2 * HOMOGENEOUS[activation]
    return sigma_w2 * mean_sq_f_prime(activation, min(q, Q_MAX))


def fixed_point(activation: Activation, sigma_w2: float, sigma_b2: float, q0: float = 1.0) -> float:
    """q* = lim q^(l) of the length map started at q^(1) = q0: 0.0, a finite q > 0, or inf.

    The length map is increasing in q for every activation here, so its iterates move monotonically
    from q0 to the first root of L(q) − q in the direction L(q0) − q0 points. That root is found by
    bracketing on a log grid and bisection rather than by iterating: iteration crawls near the edge of
    chaos (tanh at σ_w² = 1, σ_b = 0 has q^(l) ≈ 1/(2l), which no tolerance check would call converged).
    Homogeneous activations (identity, relu, leaky_relu) have L(q) = g·q + σ_b² with g = σ_w²·c:
    g < 1 gives σ_b²/(1 − g) (0 when σ_b = 0); g > 1 gives inf (0 if q0 = σ_b = 0); at g = 1 every q is a
    fixed point without bias (returns q0) and none is with bias (inf).
    """
    if activation in HOMOGENEOUS:
        g = sigma_w2 * HOMOGENEOUS[activation]
        if abs(g - 1.0) <= CHI1_EDGE_TOL:
            return q0 if sigma_b2 == 0 else math.inf
        if g < 1.0:
            return sigma_b2 / (1.0 - g)
        return 0.0 if q0 == 0 and sigma_b2 == 0 else math.inf

    def h(q: float) -> float:
        return length_map(activation, q, sigma_w2, sigma_b2) - q

    q0 = float(q0)
    if q0 <= 0.0:
        if h(0.0) <= 0.0:
            return 0.0  # f(0) = 0 and σ_b = 0: zero stays zero
        q0 = 1e-12
    h0 = h(q0)
    if h0 == 0.0:
        return q0
    # Walk a grid of 16 points per decade from q0 toward where the iterates go; stop at the first sign flip.
    direction = 1.0 if h0 > 0 else -1.0
    decades = math.log10(Q_MAX / q0) if direction > 0 else 14.0
    n = max(2, math.ceil(16 * decades))
    prev = q0
    for q in q0 * np.logspace(0.0, direction * decades, n + 1)[1:]:
        if direction * h(q) <= 0.0:
            return _bisect(h, prev, q)
        prev = q
    return math.inf if direction > 0 else 0.0  # climbed past Q_MAX, or fell 14 decades toward q* = 0


def _bisect(h: Callable[[float], float], a: float, b: float) -> float:
    """A root of h between a and b (h(a), h(b) of opposite signs or h(b) = 0), bisecting in log q."""
    ha = h(a)
    for _ in range(200):
        m = math.sqrt(a * b)
        if abs(b - a) <= 1e-14 * max(a, b) or m in (a, b):
            break
        hm = h(m)
        if hm == 0.0:
            return m
        if (hm > 0) == (ha > 0):
            a, ha = m, hm
        else:
            b = m
    return math.sqrt(a * b)


def depth_scale(chi: float) -> float:
    """ξ = −1/ln χ1 (Schoenholz et al. 2017): ‖δ‖² changes by a factor e every |ξ| layers.

    Positive in the ordered phase (χ1 < 1, δ vanishes toward the input), negative in the chaotic phase
    (χ1 > 1, δ explodes), inf at the edge of chaos (|ln χ1| ≤ CHI1_EDGE_TOL).
    """
    log_chi = math.log(chi)
    return math.inf if abs(log_chi) <= CHI1_EDGE_TOL else -1.0 / log_chi


def edge_of_chaos(activation: Activation, sigma_b2: float, q0: float = 1.0) -> float:
    """The σ_w² at which χ1(q*) = 1 for this σ_b² (bisection in log σ_w² over [1e-3, 1e3]); nan if none.

    tanh with σ_b = 0: σ_w² = 1; homogeneous activations: σ_w² = 1/c (relu: 2), for any σ_b².
    """
    if activation in HOMOGENEOUS:
        return 1.0 / HOMOGENEOUS[activation]

    def excess(log_w2: float) -> float:
        w2 = math.exp(log_w2)
        return math.log(chi1(activation, fixed_point(activation, w2, sigma_b2, q0), w2))

    lo, hi = math.log(1e-3), math.log(1e3)
    e_lo, e_hi = excess(lo), excess(hi)
    if (e_lo > 0) == (e_hi > 0):
        return math.nan
    for _ in range(60):
        mid = (lo + hi) / 2
        e_mid = excess(mid)
        if (e_mid > 0) == (e_lo > 0):
            lo, e_lo = mid, e_mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


# ---------------------------------------------------------------------------------------------------------
# From a ModelConfig to per-layer (σ_w², σ_b²), exactly as bpexp.model initializes.
# ---------------------------------------------------------------------------------------------------------
def weight_variance(cfg: ModelConfig, fan_in: int, fan_out: int) -> float:
    """σ_w² = fan_in · Var(W_ij) for one Linear layer of shape (fan_out, fan_in) under cfg.init.

    lecun_normal: gain²; kaiming_*: 2·gain²; xavier_*: gain²·2·fan_in/(fan_in + fan_out) (gain² on square
    hidden layers, but ≈ 2·gain² on a wide-to-narrow output layer); normal/uniform: init_std²·fan_in;
    orthogonal: gain²·min(1, fan_in/fan_out), the second moment of a scaled (semi-)orthogonal matrix
    (gain² when square or wide); default (PyTorch's kaiming_uniform with a = √5): Var = 1/(3 fan_in) → ⅓.
    """
    gain2 = cfg.init_gain**2
    return {
        Init.default: 1.0 / 3.0,
        Init.normal: cfg.init_std**2 * fan_in,
        Init.uniform: cfg.init_std**2 * fan_in,  # model.py scales U(±√3·std) to std init_std
        Init.xavier_normal: gain2 * 2.0 * fan_in / (fan_in + fan_out),
        Init.xavier_uniform: gain2 * 2.0 * fan_in / (fan_in + fan_out),
        Init.kaiming_normal: 2.0 * gain2,
        Init.kaiming_uniform: 2.0 * gain2,
        Init.lecun_normal: gain2,
        Init.orthogonal: gain2 * min(1.0, fan_in / fan_out),
    }[cfg.init]


def bias_variance(cfg: ModelConfig, fan_in: int) -> float:
    """σ_b²: bias_std² (0 = zero biases); init=default keeps PyTorch's U(±1/√fan_in), Var = 1/(3 fan_in)."""
    return 1.0 / (3.0 * fan_in) if cfg.init == Init.default else cfg.bias_std**2


def init_variances(
    cfg: ModelConfig, in_dim: int, out_dim: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(σ_w², σ_b²) of layers l = 1 … L at index l − 1 (layer 1: fan_in = in_dim, L: fan_out = out_dim)."""
    widths = [in_dim] + [cfg.width] * cfg.depth + [out_dim]
    fans = list(pairwise(widths))
    return (
        tuple(weight_variance(cfg, n_in, n_out) for n_in, n_out in fans),
        tuple(bias_variance(cfg, n_in) for n_in, _ in fans),
    )


def unsupported(cfg: ModelConfig) -> str | None:
    """Why the mean-field account does not apply to cfg (None if it does)."""
    if cfg.norm != Norm.none:
        return f"model.norm={cfg.norm.value}: normalization rescales q^(l) every layer"
    if cfg.residual:
        return "model.residual=true: skip connections add to the length map and to χ1"
    if cfg.dropout > 0:
        return f"model.dropout={cfg.dropout}: dropout masks change both maps"
    return None


# ---------------------------------------------------------------------------------------------------------
# Trajectories and the prediction of one run.
# ---------------------------------------------------------------------------------------------------------
def q_trajectory(
    activation: Activation,
    sigma_w2: Sequence[float],
    sigma_b2: Sequence[float],
    input_second_moment: float,
    n_hidden: int,
) -> tuple[float, ...]:
    """q^(1) … q^(n_hidden): q^(1) = σ_w²^(1)·mean(x²) + σ_b²^(1), then the length map with layer l's σ's."""
    qs = [sigma_w2[0] * input_second_moment + sigma_b2[0]]
    for l in range(2, n_hidden + 1):
        qs.append(length_map(activation, qs[-1], sigma_w2[l - 1], sigma_b2[l - 1]))
    return tuple(qs[:n_hidden])


def slope_per_layer(values: Sequence[float]) -> float:
    """Least-squares slope of values[l − 1] against l = 1 … len(values) (0.0 for a single value)."""
    y = np.asarray(values, dtype=float)
    if y.size < 2:
        return 0.0
    l = np.arange(1, y.size + 1, dtype=float)
    return float(np.polyfit(l, y, 1)[0])


def delta_log10_profile(chis: Sequence[float]) -> tuple[float, ...]:
    """log10‖δ^(l)‖ − log10‖δ^(L)‖ for l = 1 … L from χ^(l), l = 1 … L−1: ½ Σ_{k=l}^{L−1} log10 χ^(k)."""
    half_logs = 0.5 * np.log10(np.asarray(chis, dtype=float))
    tail_sums = np.cumsum(half_logs[::-1])[::-1]  # Σ over k ≥ l
    return (*(float(v) for v in tail_sums), 0.0)


@dataclass(frozen=True)
class Prediction:
    """Mean-field predictions for one MLP at initialization (hidden layers l = 1 … L−1, output layer L)."""

    chi1: float
    """χ1 at the fixed point q* of a hidden layer: < 1 ordered (vanishing), > 1 chaotic (exploding)."""
    q_star: float
    """Fixed point of the length map reached from q^(1) (0.0, finite, or inf)."""
    depth_scale: float
    """−1/ln χ1(q*) in layers; inf at the edge of chaos, negative in the chaotic phase."""
    delta_log10_ratio: float
    """Predicted log10(‖δ^(1)‖/‖δ^(L)‖) along the q trajectory: ½ Σ_{l=1}^{L−1} log10 χ1(q^(l))."""
    delta_slope: float
    """Least-squares slope of predicted log10‖δ^(l)‖ against l = 1 … L (decades per layer)."""
    delta_log10: tuple[float, ...]
    """Predicted log10‖δ^(l)‖ − log10‖δ^(L)‖, l = 1 … L (the last entry is 0)."""
    chi1_per_layer: tuple[float, ...]
    """χ^(l) = σ_w²^(l+1) E[f'(√q^(l) z)²] = E‖δ^(l)‖²/E‖δ^(l+1)‖², l = 1 … L−1."""
    q: tuple[float, ...]
    """Forward trajectory q^(l) = E[(z_i^(l))²], l = 1 … L−1."""
    a_second_moment: tuple[float, ...]
    """E‖a^(l)‖²/n_l = E[f(√q^(l) z)²], l = 1 … L−1: the forward gain of the activations."""

    def params(self) -> dict[str, float]:
        """MLflow params: theory.chi1, theory.q_star, theory.depth_scale; a non-finite value is left out
        (MLflow cannot store inf), so a missing theory.depth_scale means the edge of chaos and a missing
        theory.q_star a diverging length map."""
        values = {
            "theory.chi1": self.chi1,
            "theory.q_star": self.q_star,
            "theory.depth_scale": self.depth_scale,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}

    def metrics(self) -> dict[str, float]:
        """Step-0 metrics next to their measured twins delta/log10_ratio and delta/slope (finite only)."""
        values = {"theory/delta_log10_ratio": self.delta_log10_ratio, "theory/delta_slope": self.delta_slope}
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def predict(
    cfg: ModelConfig, in_dim: int, out_dim: int, input_second_moment: float = 1.0
) -> Prediction | None:
    """The mean-field prediction for cfg at initialization, or None where its assumptions fail.

    input_second_moment is mean_i(x_i²) over the inputs (1.0 for standardized data). None for
    normalization, residual connections or dropout (see ``unsupported``): no prediction beats a wrong one.
    """
    if unsupported(cfg) is not None:
        return None
    act = cfg.activation
    sigma_w2, sigma_b2 = init_variances(cfg, in_dim, out_dim)
    n_hidden = cfg.depth  # L − 1
    qs = q_trajectory(act, sigma_w2, sigma_b2, input_second_moment, n_hidden)
    # χ^(l) carries δ^(l+1) back through W^(l+1): layer l+1's σ_w² (index l), at layer l's q.
    chis = tuple(chi1(act, q, sigma_w2[l]) for l, q in enumerate(qs, start=1))
    profile = delta_log10_profile(chis)
    # The asymptotic summary uses a square hidden layer's σ's (the same as σ_w²^(2) when depth ≥ 2).
    hidden_w2 = weight_variance(cfg, cfg.width, cfg.width)
    hidden_b2 = bias_variance(cfg, cfg.width)
    q1 = sigma_w2[0] * input_second_moment + sigma_b2[0]
    q_star = fixed_point(act, hidden_w2, hidden_b2, q0=q1)
    chi_star = chi1(act, q_star, hidden_w2)
    return Prediction(
        chi1=chi_star,
        q_star=q_star,
        depth_scale=depth_scale(chi_star),
        delta_log10_ratio=profile[0],
        delta_slope=slope_per_layer(profile),
        delta_log10=profile,
        chi1_per_layer=chis,
        q=qs,
        a_second_moment=tuple(activation_second_moment(act, q) for q in qs),
    )
