"""Backpropagation written out by hand, one line per equation of the seed, for the MLPs of model.py.

Notation (docs/design.md): layers l = 1 … L, a^(0) = x, z^(l) = W^(l) a^(l-1) + b^(l), a^(l) = f(z^(l)) for
hidden layers, a^(L) = z^(L) (linear output), δ^(l) = ∂L/∂z^(l). With batch-first tensors (one example
per row) the column equations turn into z = a @ W.T + b, ∂L/∂W = δ.T @ a, δ^(l) = (δ^(l+1) @ W^(l+1)) ⊙ f'.
No autograd here: every derivative is computed by hand, and the tests check each one against
``torch.autograd`` in float64. Normalization layers are out of scope (``check_supported``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bpexp.config import Activation, ConfigError, Loss
from bpexp.model import MLP

SELU_ALPHA = 1.6732632423543772848170429916717  # torch's constants (Klambauer et al. 2017)
SELU_SCALE = 1.0507009873554804934193349852946
SOFTPLUS_THRESHOLD = 20.0  # F.softplus is linear (f = z, f' = 1) above this, as torch does


def d_gelu(z: Tensor) -> Tensor:
    """GELU f = z Φ(z) (exact erf form): f' = Φ(z) + z φ(z)."""
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))  # Φ(z)
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))  # φ(z)
    return cdf + z * pdf


# f'(z) for every activation, as torch differentiates it (at a kink: relu' = 0, leaky_relu' = 0.01, elu' = α).
DERIVATIVES: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.identity: lambda z: torch.ones_like(z),
    Activation.sigmoid: lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),  # σ(1 − σ)
    Activation.tanh: lambda z: 1 - torch.tanh(z) ** 2,  # 1 − tanh²
    Activation.relu: lambda z: (z > 0).to(z.dtype),  # 1[z > 0]
    Activation.leaky_relu: lambda z: torch.where(z > 0, 1.0, torch.full_like(z, 0.01)),  # slope 0.01
    Activation.elu: lambda z: torch.where(z > 0, 1.0, torch.exp(z)),  # α = 1
    Activation.selu: lambda z: torch.where(z > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * torch.exp(z)),
    Activation.gelu: d_gelu,
    Activation.softplus: lambda z: torch.where(z > SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(z)),  # σ(z)
}


def d2_tanh(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)  # (1 − tanh²)' = −2 tanh (1 − tanh²)


def d2_sigmoid(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (1 - 2 * s)  # (σ(1 − σ))' = σ(1 − σ)(1 − 2σ)


# f''(z) for every activation, for the Hessian-vector product (piecewise-linear ones: 0 off the kink).
SECOND_DERIVATIVES: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.identity: torch.zeros_like,
    Activation.sigmoid: d2_sigmoid,
    Activation.tanh: d2_tanh,
    Activation.relu: torch.zeros_like,
    Activation.leaky_relu: torch.zeros_like,
    Activation.elu: lambda z: torch.where(z > 0, 0.0, torch.exp(z)),
    Activation.selu: lambda z: torch.where(z > 0, 0.0, SELU_SCALE * SELU_ALPHA * torch.exp(z)),
    Activation.gelu: lambda z: torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi)) * (2 - z * z),
    Activation.softplus: lambda z: torch.where(z > SOFTPLUS_THRESHOLD, 0.0, d2_softplus(z)),
}


def d2_softplus(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def check_supported(model: MLP) -> None:
    """Raise ConfigError (a ValueError) unless the model is Linear -> f -> [dropout] (+ residual) only."""
    names = {nn.BatchNorm1d: "batchnorm", nn.LayerNorm: "layernorm"}
    for norm in model.norms:
        if not isinstance(norm, nn.Identity):
            name = names.get(type(norm), type(norm).__name__)
            raise ConfigError(
                f"train.engine=manual cannot run model.norm={name}: the hand-written backward covers "
                "Linear -> activation -> dropout (+ residual) only; use model.norm=none or autograd"
            )
    if model.activation not in DERIVATIVES:
        raise ConfigError(f"train.engine=manual has no derivative for model.activation={model.activation}")


# ---------------------------------------------------------------------------------------------- dropout
def dropout_masks(model: MLP, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor] | None:
    """Inverted-dropout masks m^(1) … m^(L-1), entries 0 or 1/(1-p); None when dropout is off (p = 0 or
    model.eval()). Drawn from ``generator`` (default: the global RNG)."""
    dropout = model.dropout
    if not (isinstance(dropout, nn.Dropout) and dropout.p > 0 and model.training):
        return None
    keep = 1 - dropout.p
    shapes = [(x.shape[0], linear.out_features) for linear in model.linears[:-1]]  # (batch, width)
    return [
        torch.bernoulli(torch.full(s, keep, dtype=x.dtype, device=x.device), generator=generator) / keep
        for s in shapes
    ]


class _ReplayDropout(nn.Module):
    """Stands in for model.dropout: multiplies hidden layer l's output by the given m^(l)."""

    def __init__(self, masks: list[Tensor]):
        super().__init__()
        self.masks, self.calls = masks, 0

    def forward(self, h: Tensor) -> Tensor:
        m = self.masks[self.calls % len(self.masks)]  # called once per hidden layer, l = 1 … L-1, in order
        self.calls += 1
        return h * m


@contextmanager
def replay_masks(model: MLP, masks: list[Tensor] | None) -> Iterator[None]:
    """Inside this block model(x) drops exactly the units of ``masks`` (the mask is shared between the
    manual and the autograd engine); masks=None leaves the model as it is."""
    if masks is None:
        yield
        return
    original = model.dropout
    model.dropout = _ReplayDropout(masks)
    try:
        yield
    finally:
        model.dropout = original


# ---------------------------------------------------------------------------------------------- forward
@dataclass
class ForwardPass:
    z: list[Tensor]  # z^(1) … z^(L), each (batch, width_l)
    a: list[Tensor]  # a^(0) = x, a^(1) … a^(L), each (batch, width_l)
    masks: list[Tensor] | None  # m^(1) … m^(L-1) (already divided by 1 - p), or None: no dropout


def forward(model: MLP, x: Tensor, masks: list[Tensor] | None = None) -> ForwardPass:
    """z^(l) = W^(l) a^(l-1) + b^(l); a^(l) = [a^(l-1) +] m^(l) ⊙ f(z^(l)) for l < L; a^(L) = z^(L).

    Masks given are used as they are; otherwise they are drawn when dropout is on (model.training)."""
    check_supported(model)
    if masks is None:
        masks = dropout_masks(model, x)
    L = model.n_layers
    z: list[Tensor] = []
    a: list[Tensor] = [x]  # a^(0) = x, (batch, in_dim)
    with torch.no_grad():
        for l, linear in enumerate(model.linears, start=1):
            W, b = linear.weight, linear.bias  # (width_l, width_{l-1}), (width_l,)
            z.append(a[l - 1] @ W.T + b)  # z^(l), (batch, width_l)
            if l == L:
                a.append(z[-1])  # linear output layer: a^(L) = z^(L)
                break
            h = model.f(z[-1])  # f(z^(l)), (batch, width)
            if masks is not None:
                h = h * masks[l - 1]  # inverted dropout
            a.append(a[l - 1] + h if skips(model, l) else h)
    return ForwardPass(z, a, masks)


def skips(model: MLP, l: int) -> bool:
    """Whether layer l adds a residual path, a^(l) = a^(l-1) + …: hidden layers 2 … L-1 when residual."""
    return model.residual and 2 <= l < model.n_layers


# --------------------------------------------------------------------------------------------- backward
def resolve_loss(loss: Loss, classification: bool) -> Loss:
    """train.loss made concrete: auto is cross_entropy for classification data and mse otherwise."""
    if loss == Loss.auto:
        return Loss.cross_entropy if classification else Loss.mse
    if loss == Loss.cross_entropy and not classification:
        raise ConfigError("train.loss=cross_entropy needs classification data; use auto or mse")
    return loss


def mse_targets(y: Tensor, out: Tensor, classification: bool) -> Tensor:
    """The regression targets, or one-hot rows for class labels (MSE on classification data)."""
    return F.one_hot(y, out.shape[-1]).to(out.dtype) if classification else y


def loss_value(out: Tensor, y: Tensor, classification: bool, loss: Loss = Loss.auto) -> Tensor:
    """The training loss: softmax cross-entropy (mean over the batch) or MSE (mean over batch and outputs)."""
    if resolve_loss(loss, classification) == Loss.cross_entropy:
        return F.cross_entropy(out, y)
    return F.mse_loss(out, mse_targets(y, out, classification))


def output_delta(z_L: Tensor, y: Tensor, classification: bool, loss: Loss = Loss.auto) -> Tensor:
    """δ^(L) = ∂L/∂z^(L): (softmax(z) − onehot(y))/batch for cross-entropy, 2(a − y)/(batch·out) for MSE
    (y one-hot for classification data)."""
    batch, out_dim = z_L.shape
    if resolve_loss(loss, classification) == Loss.cross_entropy:
        return (torch.softmax(z_L, dim=1) - F.one_hot(y, out_dim).to(z_L.dtype)) / batch  # (batch, out)
    return 2 * (z_L - mse_targets(y, z_L, classification)) / (batch * out_dim)  # a^(L) = z^(L), (batch, out)


@dataclass
class ManualResult:
    loss: Tensor  # scalar L
    delta: list[Tensor]  # δ^(1) … δ^(L), each (batch, width_l)
    grads: list[tuple[Tensor, Tensor]]  # (∂L/∂W^(l), ∂L/∂b^(l)) for l = 1 … L, shaped like W^(l), b^(l)
    forward: ForwardPass


def backward(
    model: MLP, fp: ForwardPass, y: Tensor, classification: bool, loss: Loss = Loss.auto
) -> ManualResult:
    """The seed's backward pass from δ^(L) down to δ^(1), and ∂L/∂W^(l) = δ^(l) a^(l-1)ᵀ, ∂L/∂b^(l) = Σ δ^(l).

    With g^(l) = ∂L/∂a^(l): δ^(l) = g^(l) ⊙ m^(l) ⊙ f'(z^(l)) and g^(l-1) = δ^(l) W^(l) (+ g^(l) when
    layer l adds a residual path). Without residual and dropout this is the seed's
    δ^(l) = (δ^(l+1) W^(l+1)) ⊙ f'(z^(l))."""
    check_supported(model)
    f_prime = DERIVATIVES[model.activation]
    L = model.n_layers
    with torch.no_grad():
        d = output_delta(fp.z[L - 1], y, classification, loss)  # δ^(L), (batch, out)
        delta = [d]  # filled from the top: δ^(L), then δ^(L-1) in front of it, …
        g = d @ model.linears[L - 1].weight  # g^(L-1) = δ^(L) W^(L), (batch, width)
        for l in range(L - 1, 0, -1):
            m = 1.0 if fp.masks is None else fp.masks[l - 1]  # m^(l), (batch, width), or 1: no dropout
            d = g * m * f_prime(fp.z[l - 1])  # δ^(l) = g^(l) ⊙ m^(l) ⊙ f'(z^(l)), (batch, width)
            delta.insert(0, d)
            if l > 1:  # g^(l-1) = δ^(l) W^(l) [+ g^(l) through the residual path], (batch, width)
                g = d @ model.linears[l - 1].weight + (g if skips(model, l) else 0)
        grads = [
            (d.T @ a_prev, d.sum(0))  # ∂L/∂W^(l) = δ^(l)ᵀ a^(l-1) (batch-first), ∂L/∂b^(l) = Σ_batch δ^(l)
            for d, a_prev in zip(delta, fp.a[:-1], strict=True)
        ]
        value = loss_value(fp.a[L], y, classification, loss)
    return ManualResult(value, delta, grads, fp)


def manual_backward(
    model: MLP,
    x: Tensor,
    y: Tensor,
    classification: bool,
    masks: list[Tensor] | None = None,
    loss: Loss = Loss.auto,
) -> ManualResult:
    """Forward and backward by hand, then add ∂L/∂W^(l), ∂L/∂b^(l) into every parameter's ``.grad``
    (accumulating, as loss.backward() does), so any torch optimizer can step on the hand-made gradients."""
    result = backward(model, forward(model, x, masks), y, classification, loss)
    for linear, (dW, db) in zip(model.linears, result.grads, strict=True):
        for p, g in ((linear.weight, dW), (linear.bias, db)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
    return result


@torch.no_grad()
def sgd_step(model: MLP, grads: list[tuple[Tensor, Tensor]], lr: float) -> None:
    """The seed's update rule: W^(l) ← W^(l) − η ∂L/∂W^(l), b^(l) ← b^(l) − η ∂L/∂b^(l)."""
    for linear, (dW, db) in zip(model.linears, grads, strict=True):
        linear.weight.sub_(lr * dW)
        linear.bias.sub_(lr * db)


# ------------------------------------------------------------------------------------------- gradcheck
def gradcheck(model: MLP, x: Tensor, y: Tensor, classification: bool, loss: Loss = Loss.auto) -> float:
    """max over l of ‖g_manual − g_autograd‖ / ‖g_autograd‖ for g = ∂L/∂W^(l) and ∂L/∂b^(l), on one batch.

    Dropout: when it is on (model.training, p > 0) both engines use the same mask, drawn from a private
    generator, so the run's RNG stream is not advanced. Side-effect free: autograd runs through
    torch.autograd.grad, so no ``.grad`` is touched.
    0/0 counts as 0, x/0 as inf. One host sync per call (meant for probe steps)."""
    masks = dropout_masks(model, x, torch.Generator(device=x.device).manual_seed(0))
    manual = backward(model, forward(model, x, masks), y, classification, loss)
    params = [p for linear in model.linears for p in (linear.weight, linear.bias)]
    with replay_masks(model, masks), torch.enable_grad():
        auto = torch.autograd.grad(loss_value(model(x), y, classification, loss), params)
    mine = [g for pair in manual.grads for g in pair]
    errors = torch.stack(
        [relative_error(m.double(), a.double()) for m, a in zip(mine, auto, strict=True)]
    )  # (2L,)
    return errors.max().item()


def relative_error(mine: Tensor, ref: Tensor) -> Tensor:
    """‖mine − ref‖ / ‖ref‖ (0 when both are zero)."""
    diff, norm = torch.linalg.vector_norm(mine - ref), torch.linalg.vector_norm(ref)
    return torch.where(diff == 0, torch.zeros_like(diff), diff / norm)


# ------------------------------------------------------------------------------ Hessian-vector products
@dataclass
class Curvature:
    """One forward and backward pass, kept for any number of Hessian-vector products at the same θ."""

    fp: ForwardPass
    delta: list[Tensor]  # δ^(1) … δ^(L)
    slope: list[Tensor]  # f'(z^(l)) of the hidden layers
    bend: list[Tensor]  # g^(l) ⊙ f''(z^(l)): how δ^(l) moves when z^(l) does, for g^(l) fixed
    probs: Tensor | None  # softmax(z^(L)) for cross-entropy, None for MSE
    loss: Loss


def curvature(model: MLP, x: Tensor, y: Tensor, classification: bool, loss: Loss = Loss.auto) -> Curvature:
    """The seed's forward and backward at θ (no dropout: the product is of one deterministic loss)."""
    fp = forward(model, x)  # no masks are drawn: only called for nets without dropout
    f_prime, f_second = DERIVATIVES[model.activation], SECOND_DERIVATIVES[model.activation]
    L, kind = model.n_layers, resolve_loss(loss, classification)
    with torch.no_grad():
        d = output_delta(fp.z[L - 1], y, classification, kind)
        delta, slope, bend = [d], [], []
        g = d @ model.linears[L - 1].weight  # g^(L-1)
        for l in range(L - 1, 0, -1):
            z = fp.z[l - 1]
            slope.insert(0, f_prime(z))
            bend.insert(0, g * f_second(z))
            d = g * slope[0]
            delta.insert(0, d)
            if l > 1:
                g = d @ model.linears[l - 1].weight + (g if skips(model, l) else 0)
        probs = torch.softmax(fp.z[L - 1], dim=1) if kind == Loss.cross_entropy else None
    return Curvature(fp, delta, slope, bend, probs, kind)


@torch.no_grad()
def hessian_vector_product(model: MLP, c: Curvature, v: list[Tensor]) -> list[Tensor]:
    """H·v for v = (V_W^(1), V_b^(1), …) shaped like the parameters, by the R-operator (Pearlmutter 1994)
    on the equations above: R{z^(l)} = R{a^(l-1)} Wᵀ + a^(l-1) V_Wᵀ + V_b,
    R{a^(l)} = f'(z)·R{z} (+ R{a^(l-1)}),
    R{δ^(L)} = ∂δ^(L)/∂z^(L)·R{z^(L)}, R{g^(l-1)} = R{δ^(l)} W + δ^(l) V_W (+ R{g^(l)}),
    R{δ^(l)} = R{g^(l)}·f'(z) + g^(l)·f''(z)·R{z^(l)}, and H·v for W^(l) = R{δ}ᵀ a^(l-1) + δᵀ R{a^(l-1)}.
    Cost: about two training steps of matrix products, with no autograd graph."""
    L, a, batch, out_dim = model.n_layers, c.fp.a, *c.fp.z[-1].shape
    weights = [linear.weight for linear in model.linears]
    Ra: list[Tensor | None] = [None]  # R{a^(0)} = 0
    Rz = []
    for l in range(1, L + 1):
        V_W, V_b = v[2 * l - 2], v[2 * l - 1]
        r = a[l - 1] @ V_W.T + V_b
        if Ra[l - 1] is not None:
            r = r + Ra[l - 1] @ weights[l - 1].T
        Rz.append(r)
        if l < L:
            h = c.slope[l - 1] * r
            Ra.append(Ra[l - 1] + h if skips(model, l) else h)
    r = Rz[-1]
    if c.probs is None:
        Rd = 2 * r / (batch * out_dim)
    else:
        p = c.probs
        Rd = (p * r - p * (p * r).sum(1, keepdim=True)) / batch
    out: list[Tensor] = []
    Rg = None
    for l in range(L, 0, -1):
        d, V_W = c.delta[l - 1], v[2 * l - 2]
        if l < L:
            Rd = Rg * c.slope[l - 1] + c.bend[l - 1] * Rz[l - 1]
        grad_W = Rd.T @ a[l - 1]
        if Ra[l - 1] is not None:
            grad_W = grad_W + d.T @ Ra[l - 1]
        out[:0] = [grad_W, Rd.sum(0)]
        if l > 1:
            step = Rd @ weights[l - 1] + d @ V_W
            Rg = Rg + step if (Rg is not None and skips(model, l)) else step
    return out
