import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bpexp.config import Activation, Init, ModelConfig
from bpexp.model import build_mlp
from bpexp.names import layer_key, profile, split_key
from bpexp.probes import Dynamics, Probes, diagnose


def probed_step(cfg: ModelConfig, x, y, lr=0.1, dtype=torch.float64):
    """One SGD step with the probes read and collected, as the loop does it."""
    torch.manual_seed(0)
    net = build_mlp(cfg, x.shape[1], y.shape[1]).to(dtype)
    probes = Probes(net, every=1)
    out, zs, acts = net.trace(x)
    loss = F.mse_loss(out, y)
    loss.backward()
    probes.read([z.grad for z in zs], [*acts, out.detach()], {"train/loss": loss})
    grads = [l.weight.grad.clone() for l in net.linears]
    before = [l.weight.detach().clone() for l in net.linears]
    torch.optim.SGD(net.parameters(), lr=lr).step()
    return net, probes.collect(stepped=True), grads, before, loss


def test_delta_is_dL_dz_computed_by_hand():
    """δ^(L) = 2(a^(L) − y)/(B·n_out) for mean MSE; δ^(l) = (δ^(l+1) W^(l+1)) ⊙ f'(z^(l))."""
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    cfg = ModelConfig(depth=2, width=4, activation=Activation.tanh, init=Init.lecun_normal, bias_std=0.1)
    _, m, _, _, loss = probed_step(cfg, x, y)
    torch.manual_seed(0)
    ref = build_mlp(cfg, 3, 2).to(torch.float64)
    z1 = x @ ref.linears[0].weight.T + ref.linears[0].bias
    z2 = torch.tanh(z1) @ ref.linears[1].weight.T + ref.linears[1].bias
    z3 = torch.tanh(z2) @ ref.linears[2].weight.T + ref.linears[2].bias
    d3 = 2 * (z3 - y) / y.numel()
    d2 = (d3 @ ref.linears[2].weight) * (1 - torch.tanh(z2) ** 2)
    d1 = (d2 @ ref.linears[1].weight) * (1 - torch.tanh(z1) ** 2)
    for l, d in enumerate([d1, d2, d3], start=1):
        assert m[layer_key("delta_norm", l)] == pytest.approx(d.norm().item(), rel=1e-12)
    assert m[layer_key("grad_norm", 1)] == pytest.approx((d1.T @ x).norm().item(), rel=1e-12)
    assert m["train/loss"] == pytest.approx(loss.item())
    assert m["delta/log10_ratio"] == pytest.approx(math.log10(d1.norm().item() / d3.norm().item()), rel=1e-12)


def test_norms_updates_and_total():
    torch.manual_seed(2)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    cfg = ModelConfig(depth=3, width=8, activation=Activation.relu, init=Init.kaiming_normal)
    net, m, grads, before, _ = probed_step(cfg, x, y, lr=0.1)
    for l, (g, w) in enumerate(zip(grads, before, strict=True), start=1):
        assert m[layer_key("grad_norm", l)] == pytest.approx(g.norm().item(), rel=1e-12)
        assert m[layer_key("weight_norm", l)] == pytest.approx(w.norm().item(), rel=1e-12)
        # plain SGD: ΔW = −η ∂L/∂W exactly
        assert m[layer_key("update_ratio", l)] == pytest.approx(
            0.1 * g.norm().item() / w.norm().item(), rel=1e-9
        )
    every_grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert m["grad_norm/total"] == pytest.approx(every_grad.norm().item(), rel=1e-12)
    assert {split_key(k)[0] for k in m} >= {"act_mean", "act_std", "dead", "grad_norm_b"}
    assert not any(k.startswith("saturation/") for k in m)  # ReLU: dead units, not saturation


def test_float32_gradients_below_1e_19_do_not_vanish_to_zero():
    """float32 squares underflow (1e-25² = 0): the probes take norms in float64."""
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    cfg = ModelConfig(depth=1, width=3, init=Init.lecun_normal)
    net = build_mlp(cfg, 3, 1)
    probes = Probes(net, every=1)
    out, zs, acts = net.trace(x)
    F.mse_loss(out, y).mul(1e-25).backward()
    assert net.linears[0].weight.grad.norm() == 0  # float32's own norm loses it
    probes.read([z.grad for z in zs], [*acts, out.detach()], {})
    m = probes.collect(stepped=False)
    assert 1e-30 < m[layer_key("grad_norm", 1)] < 1e-20
    assert "update_ratio/l001" not in m


def test_dead_and_saturated_units():
    x = torch.randn(32, 4, dtype=torch.float64)
    relu = ModelConfig(depth=2, width=5, activation=Activation.relu, init=Init.lecun_normal)
    torch.manual_seed(0)
    net = build_mlp(relu, 4, 1).to(torch.float64)
    with torch.no_grad():
        net.linears[1].bias.fill_(-100.0)  # layer 2 can never fire
    probes = Probes(net, every=1)
    out, zs, acts = net.trace(x)
    out.sum().backward()
    probes.read([z.grad for z in zs], [*acts, out.detach()], {})
    m = probes.collect(stepped=False)
    assert m["dead/l002"] == 1.0 and m["dead/l001"] < 1.0
    assert diagnose(m) == "dead_units"

    sig = ModelConfig(depth=2, width=5, activation=Activation.sigmoid, init=Init.normal, init_std=30.0)
    net = build_mlp(sig, 4, 1).to(torch.float64)
    probes = Probes(net, every=1)
    out, zs, acts = net.trace(x)
    out.sum().backward()
    probes.read([z.grad for z in zs], [*acts, out.detach()], {})
    m = probes.collect(stepped=False)
    assert m["saturation/l001"] > 0.8 and "dead/l001" not in m


@pytest.mark.parametrize(
    "activation", [Activation.elu, Activation.selu, Activation.gelu, Activation.leaky_relu]
)
def test_units_at_or_below_zero_are_dead_only_for_relu(activation):
    """elu, selu, gelu and leaky_relu pass gradient below 0: their share at ≤ 0 is `nonpositive`."""
    x = torch.randn(32, 4, dtype=torch.float64)
    torch.manual_seed(0)
    net = build_mlp(ModelConfig(depth=2, width=5, activation=activation, init=Init.lecun_normal), 4, 1)
    net = net.to(torch.float64)
    with torch.no_grad():
        net.linears[1].bias.fill_(-100.0)  # layer 2 is below 0 on the whole batch
    probes = Probes(net, every=1)
    out, zs, acts = net.trace(x)
    out.sum().backward()
    probes.read([z.grad for z in zs], [*acts, out.detach()], {})
    m = probes.collect(stepped=False)
    assert m["nonpositive/l002"] == 1.0 and not any(k.startswith("dead/") for k in m)
    assert diagnose(m) != "dead_units"


def test_profile_ratio_and_slope_by_hand():
    ratio, slope = profile(np.array([1e-6, 1e-4, 1e-2, 1.0]))
    assert ratio == pytest.approx(-6.0) and slope == pytest.approx(2.0)
    ratio, _ = profile(np.array([0.0, 1.0]))
    assert ratio == pytest.approx(-300.0)  # an exact zero stays finite


@pytest.mark.parametrize(
    ("metrics", "word"),
    [
        ({"delta/log10_ratio": -7.4}, "vanishing"),
        ({"delta/log10_ratio": 3.0}, "exploding"),
        ({"delta/log10_ratio": -0.3, "dead/l001": 0.1, "dead/l002": 0.7}, "dead_units"),
        ({"delta/log10_ratio": 0.0, "saturation/l001": 0.9, "saturation/l002": 0.6}, "saturated"),
        ({"delta/log10_ratio": -1.0, "saturation/l001": 0.1}, "healthy"),
        ({"train/loss": 0.3, "val/loss": 0.4}, "unprobed"),  # probes off: no evidence, not "healthy"
        ({"delta/log10_ratio": -0.3, "nonpositive/l001": 1.0}, "healthy"),  # elu units at ≤ 0 still learn
    ],
)
def test_diagnose(metrics, word):
    assert diagnose(metrics) == word


def test_keys_and_dynamics_frame(tmp_path):
    assert split_key(layer_key("delta_norm", 12)) == ("delta_norm", 12)
    assert split_key("delta/log10_ratio") == ("delta/log10_ratio", None)
    d = Dynamics()
    d.add(0, {"grad_norm/l001": 1.5, "train/loss": 2.0})
    d.add(10, {"grad_norm/l001": float("nan")})
    frame = d.frame()
    assert list(frame.columns) == ["step", "layer", "quantity", "value"]
    assert frame["layer"].isna().tolist() == [False, True, False]
    import pandas as pd

    back = pd.read_parquet(d.write(tmp_path / "d.parquet"))
    assert back["value"].isna().tolist() == [False, False, True] and back["step"].tolist() == [0, 0, 10]
