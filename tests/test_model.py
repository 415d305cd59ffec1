import math

import pytest
import torch
from torch import nn

from bpexp.config import Activation, Init, ModelConfig, Norm
from bpexp.model import build_mlp, first_nonfinite_layer

FAN_IN, FAN_OUT = 400, 300


def hidden_weight(init: Init, **kw) -> torch.Tensor:
    """The weight of the one hidden->hidden layer of a depth-2 net: shape (FAN_OUT, FAN_IN)."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, width=FAN_OUT, init=init, **kw)
    return build_mlp(cfg, in_dim=FAN_IN, out_dim=3).linears[0].weight.detach()


@pytest.mark.parametrize(
    ("init", "std"),
    [
        (Init.normal, 0.05),
        (Init.uniform, 0.05),
        (Init.xavier_normal, 1.5 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        (Init.xavier_uniform, 1.5 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        (Init.kaiming_normal, 1.5 * math.sqrt(2 / FAN_IN)),
        (Init.kaiming_uniform, 1.5 * math.sqrt(2 / FAN_IN)),
        (Init.lecun_normal, 1.5 / math.sqrt(FAN_IN)),
    ],
)
def test_variance_scaling_inits_have_the_stated_std(init, std):
    w = hidden_weight(init, init_std=0.05, init_gain=1.5)
    assert w.mean().abs() < 0.02 * std * 10
    assert w.std().item() == pytest.approx(std, rel=0.01)  # 120k samples: sampling error ~0.2%
    if init in (Init.uniform, Init.xavier_uniform, Init.kaiming_uniform):
        assert w.abs().max() <= math.sqrt(3) * std


def test_orthogonal_honours_the_gain():
    w = hidden_weight(Init.orthogonal, init_gain=2.0)
    assert torch.allclose(w @ w.T, 4.0 * torch.eye(FAN_OUT), atol=1e-4)


def test_bias_std_and_default_init():
    torch.manual_seed(0)
    net = build_mlp(ModelConfig(depth=1, width=FAN_OUT, init=Init.lecun_normal, bias_std=0.3), FAN_IN, 3)
    assert net.linears[0].bias.std().item() == pytest.approx(0.3, rel=0.15)
    zero = build_mlp(ModelConfig(depth=1, width=8, init=Init.lecun_normal), 4, 3)
    assert torch.count_nonzero(zero.linears[0].bias) == 0
    torch.manual_seed(1)
    default = build_mlp(ModelConfig(depth=0, init=Init.default), 4, 3).linears[0]
    torch.manual_seed(1)
    assert torch.equal(default.weight, nn.Linear(4, 3).weight)  # PyTorch's own init, untouched


def test_shapes_layers_and_kept_pre_activations():
    net = build_mlp(ModelConfig(depth=3, width=8, activation=Activation.tanh, norm=Norm.layernorm), 5, 2)
    assert net.n_layers == 4
    assert [tuple(l.weight.shape) for l in net.linears] == [(8, 5), (8, 8), (8, 8), (2, 8)]
    x = torch.randn(7, 5)
    out, zs, acts = net.trace(x)
    assert [tuple(z.shape) for z in zs] == [(7, 8)] * 3 + [(7, 2)] and zs[-1] is out
    assert len(acts) == 3 and torch.allclose(acts[0], torch.tanh(net.norms[0](zs[0])))
    assert torch.equal(net(x), out)  # forward computes the same, keeping nothing
    out.sum().backward()
    assert all(z.grad is not None for z in zs)  # δ^(l) = ∂L/∂z^(l) retained for the probes


def test_residual_adds_the_previous_activation():
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, width=6, activation=Activation.relu, init=Init.lecun_normal, residual=True)
    net = build_mlp(cfg, 3, 1)
    x = torch.randn(4, 3)
    a1 = torch.relu(net.linears[0](x))
    a2 = a1 + torch.relu(net.linears[1](a1))
    assert torch.allclose(net(x), net.linears[2](a2))


def test_first_nonfinite_layer():
    net = build_mlp(ModelConfig(depth=3, width=4, init=Init.lecun_normal), 2, 1)
    x = torch.randn(3, 2)
    assert first_nonfinite_layer(net, x) is None
    with torch.no_grad():
        net.linears[1].weight[0, 0] = float("inf")
    assert first_nonfinite_layer(net, x) == 2
