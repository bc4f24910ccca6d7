"""LBEN baseline: parametrisation, equivalence with the LBEN equation, the certified
Lipschitz bound (and a negative control), implicit gradients, monDEQ as a special case."""

from __future__ import annotations

import math

import pytest
import torch
from pcdeq_baselines.lben import LbenConvNet, LbenConvOperator, LbenFcNet, LbenFcOperator
from pcdeq_baselines.lben.operators import pool_adjoint
from pcdeq_baselines.mondeq.splitting import relu_prox

from pcdeq_plugin import build_model

SHAPE = (1, 5, 5)  # tiny images: the conv state is 7x7


def _dense(fn, shape):
    """Matrix (acting on flattened column vectors) of a linear map on one-tensor states."""
    n = math.prod(shape)
    basis = torch.eye(n).reshape(n, *shape)
    return fn((basis,))[0].reshape(n, -1).T


def _randomise(module, scale=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1] in ("psi", "g", "h"):
                p.copy_(torch.empty_like(p).uniform_(-scale, scale) + (name[-1] != "i"))


def _tiny(name, **options):
    torch.manual_seed(2)
    sizes = {"lben-fc": {"width": 6}, "lben-conv": {"channels": 3, "pool": 3, "m": 0.5}}
    options = {"tune_alpha": False, **sizes[name], **options}
    model = build_model(name, SHAPE, 3, **options)
    _randomise(model.operator)
    return model


OPERATORS = {
    "fc": lambda gamma: LbenFcOperator(7, 5, 3, gamma),
    "conv": lambda gamma: LbenConvOperator(2, 3, (6, 6), 3, gamma, pool=2, metric="full"),
    "conv-channels": lambda gamma: LbenConvOperator(
        2, 3, (6, 6), 3, gamma, pool=3, metric="channels"
    ),
}


def test_parameter_counts_match_the_released_architectures():
    def count(name, shape, **options):
        return sum(p.numel() for p in build_model(name, shape, 10, **options).parameters())

    assert count("lben-fc", (1, 28, 28), preset="mnist") == 76_490  # the released code: 76,490
    assert count("mondeq-fc", (1, 28, 28), width=80) == 76_410  # + 80 metric entries
    assert count("lben-conv", (3, 32, 32), preset="cifar10") == 448_104
    assert count("lben-conv", (1, 28, 28), preset="mnist") == 155_640


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("gamma", [None, 0.7])
def test_operator_is_monotone_and_its_transpose_exact(kind, gamma, float64):
    op = OPERATORS[kind](gamma)
    _randomise(op)
    shape = op.state_shapes(1)[0][1:]
    w = _dense(op.multiply, shape)
    assert torch.allclose(_dense(op.multiply_transpose, shape), w.T, atol=1e-12)
    eye = torch.eye(w.shape[0])
    # H = I - W' is strongly monotone: what the splitting theory needs
    assert torch.linalg.eigvalsh(eye - (w + w.T) / 2).min() >= op.m - 1e-9


def test_pool_adjoint_is_the_adjoint_of_average_pooling(float64):
    x, y = torch.randn(2, 3, 7, 7), torch.randn(2, 3, 2, 2)
    lhs = (torch.nn.functional.avg_pool2d(x, 3) * y).sum()
    assert torch.allclose(lhs, (x * pool_adjoint(y, 3, (7, 7))).sum(), atol=1e-12)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("gamma", [None, 0.7])
def test_resolvent_is_the_dense_inverse(kind, gamma, float64):
    op = OPERATORS[kind](gamma)
    _randomise(op)
    shape = op.state_shapes(1)[0][1:]
    w = _dense(op.multiply, shape)
    eye = torch.eye(w.shape[0])
    inverse = torch.linalg.inv(eye + 0.3 * (eye - w))
    resolvent = op.resolvent(0.3)
    assert torch.allclose(_dense(resolvent.apply, shape), inverse, atol=1e-10)
    assert torch.allclose(_dense(resolvent.apply_transpose, shape), inverse.T, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lben-fc", {"splitting": "pr"}),
        ("lben-fc", {"splitting": "fb", "alpha": 0.2}),
        ("lben-conv", {"splitting": "fb", "alpha": 0.2}),
        ("lben-conv", {"splitting": "pr"}),
        ("lben-conv", {"splitting": "pr", "gamma": None}),
    ],
)
def test_equilibrium_solves_the_lben_equation_itself(name, options, float64):
    """The monDEQ-form solve returns z = relu(W z + U x + b) for LBEN's W = I - Psi H."""
    model = _tiny(name, tol=1e-11, max_iter=5000, stop_rule="residual", **options)
    op = model.operator
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        (z,) = model.block(x)
        psi = torch.exp(op.psi) if op.psi is not None else 1.0
        h_z = z - op.multiply((z,))[0]
        u = op.injection(x)[0] / op.metric_inverse()  # U x + b
        image = relu_prox(op.interior_masks(z))((z - psi * h_z + u,))[0]
    assert torch.allclose(z, image, atol=1e-8)
    assert model.block.last_stats.forward.all_converged


@pytest.mark.parametrize("name", ["lben-fc", pytest.param("lben-conv", marks=pytest.mark.slow)])
def test_lipschitz_bound_holds_on_random_and_adversarial_pairs(name, float64):
    gamma = 0.3
    conv = name == "lben-conv"  # its solve is ~20x dearer: a smaller batch, tol 1e-9
    tol = 1e-9 if conv else 1e-10
    model = _tiny(name, gamma=gamma, splitting="pr", tol=tol, max_iter=5000, stop_rule="residual")
    _scale_inputs(model, 4.0)  # a strong input map: the bound has to bind
    x1 = torch.randn(12 if conv else 32, *SHAPE)
    model.tune_alpha(x1)  # PR converges for any alpha; a tuned one is just faster
    x2 = x1 + 0.3 * torch.randn_like(x1)
    ratios = _ratios(model, x1, x2)
    adversarial = _adversarial_ratios(model, x1[:6], steps=8 if conv else 25)
    assert model.lipschitz_certificate().bound == gamma
    assert ratios.max() <= gamma * (1 + 1e-6), float(ratios.max())
    assert adversarial.max() <= gamma * (1 + 1e-6), float(adversarial.max())
    assert adversarial.max() > 0.2 * gamma  # the search found pairs that come close


@pytest.mark.parametrize("name", ["lben-fc", "lben-conv"])
def test_negative_control_the_bound_fails_without_the_parametrisation(name, float64):
    gamma = 0.3
    model = _tiny(name, gamma=gamma, splitting="pr", tol=1e-10, max_iter=5000, stop_rule="residual")
    _scale_inputs(model, 4.0)
    model.operator.gamma = None  # bypass: drop the terms that enforce the bound
    x1 = torch.randn(6, *SHAPE)
    model.tune_alpha(x1)
    steps = 25 if name == "lben-fc" else 8
    assert _adversarial_ratios(model, x1, steps=steps).max() > 1.5 * gamma


def test_fc_lmi_is_positive_definite_only_with_the_parametrisation(float64):
    model = _tiny("lben-fc", gamma=0.5)
    _scale_inputs(model, 4.0)
    assert model.lipschitz_certificate().lmi_min_eigenvalue > 0
    model.operator.gamma = None
    bypassed = model.operator.lben_weight()
    model.operator.gamma = 0.5
    from pcdeq_baselines.lben.certificate import fc_lmi_min_eigenvalue

    op = model.operator
    eig = fc_lmi_min_eigenvalue(bypassed, op.metric_inverse(), op.U.weight, op.G.weight, 0.5)
    assert eig < 0
    assert (
        build_model("lben-fc", SHAPE, 3, width=4, gamma=None).lipschitz_certificate().bound is None
    )


def _scale_inputs(model, factor):
    with torch.no_grad():
        model.operator.U.weight.mul_(factor)
        model.operator.G.weight.mul_(factor)


def _ratios(model, x1, x2):
    with torch.no_grad():
        dy = (model(x1) - model(x2)).norm(dim=1)
    return dy / (x1 - x2).flatten(1).norm(dim=1)


def _adversarial_ratios(model, x1, steps=25):
    """Gradient ascent on ||f(x + d) - f(x)|| / ||d|| over small perturbations d."""
    d = (1e-2 * torch.randn_like(x1)).requires_grad_()
    opt = torch.optim.Adam([d], lr=2e-2)
    for _ in range(steps):
        ratio = (model(x1 + d) - model(x1)).norm(dim=1) / d.flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return _ratios(model, x1, (x1 + d).detach())


def _unrolled_logits(model, x, alpha=0.2, iterations=400):
    op = model.operator
    bias = op.injection(x)
    prox = relu_prox(op.interior_masks(bias[0]))
    z = tuple(torch.zeros_like(b) for b in bias)
    for _ in range(iterations):
        wz = op.multiply(z)
        z = prox(tuple((1 - alpha) * zi + alpha * (w + b) for zi, w, b in zip(z, wz, bias)))
    return op.G(z[0]) if isinstance(model, LbenFcNet) else op.read_out(z[0])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lben-fc", {"splitting": "pr"}),
        ("lben-fc", {"splitting": "fb", "alpha": 0.2}),
        ("lben-conv", {"splitting": "fb", "alpha": 0.2}),
        ("lben-conv", {"splitting": "pr", "metric": "image"}),
        ("lben-conv", {"splitting": "pr", "gamma": None, "metric": "channels"}),
    ],
)
def test_implicit_gradients_match_unrolled_autograd(name, options, float64):
    model = _tiny(name, tol=1e-12, max_iter=5000, stop_rule="residual", **options)
    x = torch.randn(3, *SHAPE)
    target = torch.tensor([0, 2, 1])
    params = [p for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), target)
    implicit = torch.autograd.grad(loss, params)
    backward = model.block.last_stats.backward
    assert backward is not None and backward.all_converged and backward.max_residual < 1e-9
    loss_u = torch.nn.functional.cross_entropy(_unrolled_logits(model, x), target)
    unrolled = torch.autograd.grad(loss_u, params)
    assert torch.allclose(loss, loss_u, atol=1e-10)
    for (pname, _), gi, gu in zip(model.named_parameters(), implicit, unrolled):
        scale = gu.abs().max().clamp(min=1e-6)
        assert (gi - gu).abs().max() / scale < 1e-6, pname


def test_unbounded_lben_with_identity_metric_is_monDEQ(float64):
    lben = build_model("lben-fc", SHAPE, 3, width=6, gamma=None, tol=1e-10, stop_rule="residual")
    mon = build_model("mondeq-fc", SHAPE, 3, width=6, tol=1e-10, stop_rule="residual")
    op = lben.operator
    mon.block.operator.load_state_dict(
        {k: v for k, v in op.state_dict().items() if k.split(".")[0] in ("U", "A", "B")}
    )
    mon.head.load_state_dict(op.G.state_dict())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(lben(x), mon(x), atol=1e-8)


@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("lben-fc", {"gamma": 0}, ValueError, r"gamma must be a positive finite number .* or None"),
        ("lben-fc", {"gamma": True}, ValueError, "gamma must be a positive finite number"),
        ("lben-conv", {"gamma": "1"}, ValueError, "gamma must be a positive finite number"),
        ("lben-conv", {"metric": "diag"}, ValueError, "unknown metric 'diag'; available: full"),
        (
            "lben-conv",
            {"splitting": "pr", "channels": 21},
            ValueError,
            "splitting='forward-backward'",
        ),
        ("lben-conv", {"pool": 9}, ValueError, "pool must be an integer between 1 and 7"),
        ("lben-fc", {"width": 0}, ValueError, "width must be an integer >= 1"),
        ("lben-fc", {"gama": 1.0}, TypeError, r"lben-fc: unknown option\(s\) \['gama'\]"),
    ],
)
def test_bad_options_fail_at_build_time(name, options, error, match):
    with pytest.raises(error, match=match):
        build_model(name, SHAPE, 3, **options)


def test_registry_entries_and_presets():
    fc = build_model("lben-fc", (1, 28, 28), 10, preset="small")
    conv = build_model("lben-conv", (1, 28, 28), 10, preset="small")
    assert isinstance(fc, LbenFcNet) and isinstance(conv, LbenConvNet)
    assert fc.family == conv.family == "lben"
    assert fc.lipschitz_bound == conv.lipschitz_bound == 5.0
    assert conv.block.splitting == "forward-backward"
    summary = conv.lipschitz_certificate().summary()
    assert summary["guaranteed"] and summary["margin_bound"] == pytest.approx(5.0 * 2**0.5)
