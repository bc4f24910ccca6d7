"""GEQ baseline: parameter counts, the certified contraction, the optimisation view,
implicit gradients against unrolled autograd, failure policy and option errors."""

from __future__ import annotations

import pytest
import torch
from pcdeq_baselines.geq import GEQConvNet, GEQFcNet

from pcdeq_plugin import ConvergenceWarning, build_model

SHAPE = (1, 6, 6)


def _tiny(name, **options):
    torch.manual_seed(3)
    size = {"geq-fc": {"width": 7}, "geq-conv": {"channels": 3, "pool": 3}}[name]
    model = build_model(name, SHAPE, 3, **{**size, **options})
    with torch.no_grad():
        model.block.gain.fill_(3.0)  # ||W||^2 close to the contraction bound: a hard case
        model.block.U.weight.mul_(3.0)
    return model


def _count(name, shape, preset):
    return sum(p.numel() for p in build_model(name, shape, 10, preset=preset).parameters())


def test_parameter_counts_of_the_presets():
    assert _count("geq-fc", (1, 28, 28), "mnist") == 84_561
    assert _count("geq-conv", (1, 28, 28), "mnist") == 84_472
    assert _count("geq-conv", (3, 32, 32), "cifar10") == 171_943


@pytest.mark.parametrize("name", ["geq-fc", "geq-conv"])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_layer_is_a_contraction_with_the_certified_factor(name, kernel, float64):
    model = _tiny(name, kernel=kernel)
    block = model.block
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        u, w = block.injection(x), block.weight()
        z1 = torch.rand(block.state_shape(u)) * 3
        z2 = z1 + torch.randn_like(z1)
        d_out = (block.layer(z1, u, w) - block.layer(z2, u, w)).flatten(1).norm(dim=1)
        d_in = (z1 - z2).flatten(1).norm(dim=1)
    bound = model.contraction_bound()
    assert 0.8 < bound < 0.9  # sigmoid(3) * 0.9
    assert (d_out <= bound * d_in * (1 + 1e-9)).all(), float((d_out / d_in).max())


def test_gaussian_kernel_is_one_lipschitz(float64):
    block = _tiny("geq-fc").block
    v1 = torch.randn(200, 7) * 2
    v2 = v1 + 0.1 * torch.randn_like(v1)
    ratio = (block._kernel(v1) - block._kernel(v2)).norm(dim=1) / (v1 - v2).norm(dim=1)
    assert ratio.max() <= 1 + 1e-9 and ratio.max() > 0.5


@pytest.mark.parametrize("name", ["geq-fc", "geq-conv"])
def test_equilibrium_is_a_stationary_point_of_the_hidden_objective(name, float64):
    """z* = relu(z* - grad E_smooth(z*)): the KKT condition of min_{z >= 0} E(z)."""
    model = _tiny(name, tol=1e-12, max_iter=200)
    block = model.block
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        z = block(x)
    assert block.last_stats.forward.all_converged
    u, w = block.injection(x).detach(), block.weight().detach()
    zz = z.clone().requires_grad_()
    v = u - block.apply(zz, w)
    c = block.kernel_gamma / v.shape[1]
    energy = 0.5 * zz.square().sum() - (torch.exp(-c * v.square().sum(dim=1))).sum() / (2 * c)
    (grad,) = torch.autograd.grad(energy, zz)
    assert torch.allclose(z, torch.relu(z - grad), atol=1e-9)
    assert z.abs().max() > 0  # not the trivial zero state


def _unrolled_logits(model, x, iterations=300):
    block = model.block
    u, w = block.injection(x), block.weight()
    z = torch.zeros(block.state_shape(u))
    for _ in range(iterations):
        z = block.layer(z, u, w)
    if isinstance(model, GEQConvNet):
        z = torch.nn.functional.avg_pool2d(z, model.pool).flatten(1)
    return model.head(z)


@pytest.mark.parametrize("name", ["geq-fc", "geq-conv"])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_implicit_gradients_match_unrolled_autograd(name, kernel, float64):
    model = _tiny(name, kernel=kernel, tol=1e-12, max_iter=300, backward_tol=1e-12)
    x = torch.randn(3, *SHAPE)
    target = torch.tensor([0, 2, 1])
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), target)
    implicit = torch.autograd.grad(loss, params)
    assert model.block.last_stats.backward.all_converged
    loss_u = torch.nn.functional.cross_entropy(_unrolled_logits(model, x), target)
    unrolled = torch.autograd.grad(loss_u, params)
    assert torch.allclose(loss, loss_u, atol=1e-10)
    for (pname, _), gi, gu in zip(model.named_parameters(), implicit, unrolled):
        scale = gu.abs().max().clamp(min=1e-8)
        assert (gi - gu).abs().max() / scale < 1e-6, pname


def test_iteration_cap_is_reported_by_the_common_failure_policy():
    model = _tiny("geq-fc", max_iter=1, tol=1e-12)
    with pytest.warns(ConvergenceWarning, match=r"geq: forward solve .* did not converge"):
        model(torch.randn(4, *SHAPE))
    assert model.block.last_stats.forward.num_failed == 4


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"kernel": "rbf"}, ValueError, "unknown kernel 'rbf'; available: gaussian, linear"),
        ({"contraction": 1.0}, ValueError, r"contraction must be in \(0, 1\), got 1.0"),
        ({"kernel_gamma": 0}, ValueError, "kernel_gamma must be a positive finite number"),
        ({"width": True}, ValueError, "width must be an integer >= 1"),
        ({"solver": "newton"}, Exception, "unknown solver 'newton'"),
        ({"kernal": "linear"}, TypeError, r"geq-fc: unknown option\(s\) \['kernal'\]"),
    ],
)
def test_bad_options_fail_at_build_time(options, error, match):
    with pytest.raises(error, match=match):
        build_model("geq-fc", SHAPE, 3, **options)


def test_registry_entries():
    fc = build_model("geq-fc", (1, 28, 28), 10, preset="small")
    conv = build_model("geq-conv", (3, 32, 32), 10, preset="small")
    assert isinstance(fc, GEQFcNet) and isinstance(conv, GEQConvNet)
    assert fc.family == conv.family == "geq"
    assert fc.block.config.solver == "anderson"
