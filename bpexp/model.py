"""The MLP under study: (Linear -> [norm] -> f -> [dropout]) × depth, then a linear output layer.

Layers are numbered l = 1 … L as in the seed; ``linears[l - 1]`` holds W^(l), b^(l). On probe steps
``trace`` returns every pre-activation z^(l) with its gradient retained, so δ^(l) = ∂L/∂z^(l) is read
off autograd at no extra backward pass; ``forward`` keeps nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from bpexp.config import Activation, Init, ModelConfig, Norm

ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.identity: lambda z: z,
    Activation.sigmoid: torch.sigmoid,
    Activation.tanh: torch.tanh,
    Activation.relu: F.relu,
    Activation.leaky_relu: F.leaky_relu,  # negative slope 0.01
    Activation.elu: F.elu,
    Activation.selu: F.selu,
    Activation.gelu: F.gelu,  # exact (erf) form
    Activation.softplus: F.softplus,
}


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: ModelConfig):
        super().__init__()
        widths = [in_dim] + [cfg.width] * cfg.depth + [out_dim]
        self.linears = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in pairwise(widths))
        self.norms = nn.ModuleList(make_norm(cfg.norm, cfg.width) for _ in range(cfg.depth))
        self.activation = cfg.activation
        self.f = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.residual = cfg.residual

    @property
    def n_layers(self) -> int:
        """L, the number of Linear layers."""
        return len(self.linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, None, None)

    def trace(
        self, x: torch.Tensor, inputs: list | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(a^(L), [z^(1) … z^(L)], [f(z^(1)) … f(z^(L-1))]): each z (batch, width_l) retains its grad
        (δ^(l) after backward; z^(L) is a^(L) itself), the hidden f(·) are detached, before dropout.
        `inputs`, when a list, receives each layer's input a^(l-1) as the layer saw it (after dropout)."""
        zs: list[torch.Tensor] = []
        acts: list[torch.Tensor] = []
        out = self.run(x, zs, acts, inputs)
        return out, zs, acts

    def run(
        self, x: torch.Tensor, zs: list | None, acts: list | None, inputs: list | None = None
    ) -> torch.Tensor:
        """The forward pass; appends z^(l) to `zs`, f(·) to `acts` and a^(l-1) to `inputs` when lists."""
        a = x
        for l, linear in enumerate(self.linears, start=1):
            if inputs is not None:
                inputs.append(a.detach())
            z = linear(a)
            if zs is not None:
                zs.append(z)
                if z.requires_grad:
                    z.retain_grad()
            if l == self.n_layers:
                return z  # linear output layer: a^(L) = z^(L)
            h = self.f(self.norms[l - 1](z))
            if acts is not None:
                acts.append(h.detach())
            h = self.dropout(h)
            a = a + h if self.residual and l > 1 else h
        raise AssertionError("unreachable: an MLP has at least one layer")


def make_norm(norm: Norm, width: int) -> nn.Module:
    return {Norm.none: nn.Identity, Norm.batchnorm: nn.BatchNorm1d, Norm.layernorm: nn.LayerNorm}[norm](width)


def build_mlp(cfg: ModelConfig, in_dim: int, out_dim: int) -> MLP:
    """A freshly initialized MLP (uses the global torch RNG: seed it first)."""
    model = MLP(in_dim, out_dim, cfg)
    if cfg.init != Init.default:
        for linear in model.linears:
            init_weight(linear.weight, cfg)
            init_bias(linear.bias, cfg.bias_std)
    return model


@torch.no_grad()
def init_weight(w: torch.Tensor, cfg: ModelConfig) -> None:
    """Fill W (fan_out, fan_in) exactly as cfg.init says; σ_w = cfg.init_gain scales every variance-scaling
    init and orthogonal, cfg.init_std is the std of normal and uniform."""
    fan_out, fan_in = w.shape
    gain = cfg.init_gain
    if cfg.init == Init.orthogonal:
        nn.init.orthogonal_(w, gain=gain)
        return
    std = {
        Init.normal: cfg.init_std,
        Init.uniform: cfg.init_std,
        Init.xavier_normal: gain * math.sqrt(2 / (fan_in + fan_out)),  # Glorot & Bengio 2010
        Init.xavier_uniform: gain * math.sqrt(2 / (fan_in + fan_out)),
        Init.kaiming_normal: gain * math.sqrt(2 / fan_in),  # He et al. 2015, for ReLU
        Init.kaiming_uniform: gain * math.sqrt(2 / fan_in),
        Init.lecun_normal: gain / math.sqrt(fan_in),  # LeCun 1998: Var = σ_w²/fan_in
    }[cfg.init]
    if cfg.init in (Init.uniform, Init.xavier_uniform, Init.kaiming_uniform):
        bound = math.sqrt(3) * std  # U(-b, b) has std b/√3
        nn.init.uniform_(w, -bound, bound)
    else:
        nn.init.normal_(w, 0.0, std)


@torch.no_grad()
def init_bias(b: torch.Tensor, bias_std: float) -> None:
    if bias_std == 0:
        nn.init.zeros_(b)
    else:
        nn.init.normal_(b, 0.0, bias_std)


@torch.no_grad()
def first_nonfinite_layer(model: MLP, x: torch.Tensor) -> int | None:
    """The lowest l whose W^(l), b^(l) or z^(l) holds a NaN/inf (None if all are finite)."""
    for l, linear in enumerate(model.linears, start=1):
        if not (torch.isfinite(linear.weight).all() and torch.isfinite(linear.bias).all()):
            return l
    _, zs, _ = model.trace(x)
    return next((l for l, z in enumerate(zs, start=1) if not torch.isfinite(z).all()), None)
