"""train.loss: the hand-written δ^(L) of each loss against autograd (float64), on classification and
regression targets, through backprop.backward; and the config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpexp.backprop import backward, forward, gradcheck, output_delta, resolve_loss
from bpexp.config import Activation, ConfigError, Loss, ModelConfig, TrainLoopConfig
from bpexp.model import build_mlp

F64 = torch.float64


def autograd_output_delta(z, y, reference_loss):
    z = z.clone().requires_grad_()
    reference_loss(z, y).backward()
    return z.grad


@pytest.mark.parametrize(
    ("loss", "classification", "reference"),
    [
        (Loss.auto, True, F.cross_entropy),
        (Loss.cross_entropy, True, F.cross_entropy),
        (Loss.mse, True, lambda z, y: ((z - F.one_hot(y, z.shape[1]).to(z.dtype)) ** 2).mean()),
        (Loss.auto, False, lambda z, y: ((z - y) ** 2).mean()),
        (Loss.mse, False, lambda z, y: ((z - y) ** 2).mean()),
    ],
)
def test_output_delta_matches_autograd(loss, classification, reference):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g, dtype=F64)
    y = (
        torch.randint(0, 4, (9,), generator=g)
        if classification
        else torch.randn(9, 4, generator=g, dtype=F64)
    )
    mine = output_delta(z, y, classification, loss)
    torch.testing.assert_close(mine, autograd_output_delta(z, y, reference), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", [Loss.mse, Loss.cross_entropy])
def test_the_whole_backward_matches_autograd_for_either_loss_on_classes(loss):
    torch.manual_seed(1)
    model = build_mlp(ModelConfig(depth=3, width=8, activation=Activation.tanh), 5, 3).double()
    x, y = torch.randn(12, 5, dtype=F64), torch.randint(0, 3, (12,))
    assert gradcheck(model, x, y, classification=True, loss=loss) < 1e-12
    result = backward(model, forward(model, x), y, True, loss)
    if loss == Loss.mse:  # the loss value is MSE on one-hot rows, not cross-entropy
        expected = F.mse_loss(model(x), F.one_hot(y, 3).to(F64))
    else:
        expected = F.cross_entropy(model(x), y)
    torch.testing.assert_close(result.loss, expected)


def test_resolve_loss_and_config():
    assert resolve_loss(Loss.auto, True) == Loss.cross_entropy
    assert resolve_loss(Loss.auto, False) == Loss.mse
    assert resolve_loss(Loss.mse, True) == Loss.mse
    with pytest.raises(ConfigError, match=r"train\.loss=cross_entropy needs classification data"):
        resolve_loss(Loss.cross_entropy, False)
    assert TrainLoopConfig().loss == Loss.auto
