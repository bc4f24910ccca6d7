"""NODE / ANODE baselines: sizes, gradients, NFE statistics, failed solves that do not abort."""

from __future__ import annotations

import warnings

import pytest
import torch
from pcdeq_baselines.node import (
    ADAPTIVE_METHODS,
    MODEL_SPECS,
    ODE_METHODS,
    ConvODEFunc,
    ODEBlock,
    build_anode,
    build_node,
)
from torch import nn

import pcdeq_plugin
import pcdeq_plugin.registry
from pcdeq_plugin import ConvergenceError, ConvergenceWarning, ImplicitModel

# (model, preset, input shape, published size): ANODE paper sizes quoted by monDEQ's Table 1.
PUBLISHED = [
    ("node", "mnist", (1, 28, 28), 84_000),
    ("node", "svhn", (3, 32, 32), 172_000),
    ("node", "cifar10", (3, 32, 32), 172_000),
    ("anode", "mnist", (1, 28, 28), 84_000),
    ("anode", "svhn", (3, 32, 32), 172_000),
    ("anode", "cifar10", (3, 32, 32), 172_000),
]
BUILDERS = {"node": build_node, "anode": build_anode}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "preset", "shape", "published"), PUBLISHED)
def test_parameter_counts_match_published_sizes(name, preset, shape, published):
    spec = MODEL_SPECS[name]
    model = spec.factory(shape, 10, **spec.presets[preset])
    assert abs(_count(model) - published) / published < 0.02


# (model, input shape, exact count without a preset): the size follows the input shape like
# the other families' factories (issue 12: 3x32x32 gave 108,568 / 120,602 before)
DEFAULT_SIZES = [
    ("node", (1, 28, 28), 85_316),
    ("node", (3, 32, 32), 173_611),
    ("anode", (1, 28, 28), 85_462),
    ("anode", (3, 32, 32), 172_452),
]


@pytest.mark.parametrize(("name", "shape", "expected"), DEFAULT_SIZES)
def test_sizes_without_a_preset_follow_the_input_shape(name, shape, expected):
    default = BUILDERS[name](shape, 10)
    preset = "mnist" if shape[0] == 1 else "svhn"
    assert _count(default) == expected
    assert _count(default) == _count(
        MODEL_SPECS[name].factory(shape, 10, **MODEL_SPECS[name].presets[preset])
    )


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_specs_are_complete(name):
    spec = MODEL_SPECS[name]
    assert spec.name == name and spec.family == name
    assert {"mnist", "svhn", "cifar10", "small"} <= set(spec.presets)
    model = spec.factory((1, 28, 28), 10, **spec.presets["small"])
    assert isinstance(model, ImplicitModel) and model.family == name
    assert spec.training["lr"] == 1e-3


def _small_model(name: str, *, adjoint: bool, tol: float = 1e-3, **kw) -> ImplicitModel:
    extra = {"augment_channels": 2} if name == "anode" else {}
    return BUILDERS[name](
        (1, 5, 5), 3, hidden=3, adjoint=adjoint, rtol=tol, atol=tol, **extra, **kw
    )


@pytest.mark.parametrize("name", ["node", "anode"])
def test_adjoint_and_direct_gradients_agree(name, float64):
    torch.manual_seed(1)
    # Smooth dynamics: with ReLU kinks the adaptive adjoint needs hundreds of steps here.
    adj = _small_model(name, adjoint=True, tol=1e-7, nonlinearity="softplus")
    direct = _small_model(name, adjoint=False, tol=1e-7, nonlinearity="softplus")
    direct.load_state_dict(adj.state_dict())
    x = torch.rand(2, 1, 5, 5)
    target = torch.randn(2, 3)
    grads = {}
    for label, model in (("adjoint", adj), ("direct", direct)):
        xi = x.clone().requires_grad_()
        loss = ((model(xi) - target) ** 2).sum()
        loss.backward()
        grads[label] = [p.grad.clone() for p in model.parameters()] + [xi.grad.clone()]
    for ga, gd in zip(grads["adjoint"], grads["direct"]):
        assert (ga - gd).norm() <= 1e-4 * gd.norm() + 1e-9, (ga - gd).norm() / gd.norm()
    # the dynamics really receive a gradient (not only the read-out)
    assert adj.odefunc.conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("adjoint", [True, False])
def test_nfe_recorded_forward_and_backward(adjoint):
    model = _small_model("node", adjoint=adjoint)
    model(torch.rand(4, 1, 5, 5)).sum().backward()
    (stats,) = model.solver_stats()
    fwd, bwd = stats.forward, stats.backward
    assert fwd.unit == bwd.unit == "nfe"
    # dopri5: 2 evaluations to pick the first step, then 6 per step (FSAL)
    assert fwd.iterations >= 8 and (fwd.iterations - 2) % 6 == 0
    assert fwd.all_converged and fwd.max_iter == 1000 and fwd.batch_size == 4
    assert bwd.iterations > 0 and bwd.all_converged
    if adjoint:
        assert bwd.solver == "dopri5/adjoint"
    else:  # one VJP per evaluation on the gradient path (the step-size probe is not on it)
        assert bwd.solver == "dopri5/backprop" and bwd.iterations <= fwd.iterations


def test_no_grad_forward_records_no_backward():
    model = _small_model("anode", adjoint=True)
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 5, 5))
    (stats,) = model.solver_stats()
    assert logits.shape == (2, 3) and stats.forward.iterations > 0 and stats.backward is None


def test_fixed_grid_method_by_name():
    model = _small_model("node", adjoint=False, method="rk4", ode_options={"step_size": 0.5})
    model(torch.rand(2, 1, 5, 5)).sum().backward()
    fwd = model.solver_stats()[0].forward
    assert fwd.iterations == 8 and fwd.max_iter == 0  # 2 steps x 4 stages, no step limit


def test_unknown_method_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown ODE method 'rk5'.*dopri5.*rk4"):
        build_node((1, 5, 5), 3, hidden=2, method="rk5")
    with pytest.raises(TypeError, match="unknown option.*'widht'"):
        build_anode((1, 5, 5), 3, widht=3)
    with pytest.raises(ValueError, match="on_failure"):
        build_node((1, 5, 5), 3, hidden=2, on_failure="explode")
    assert "dopri5" in ADAPTIVE_METHODS and "rk4" in ODE_METHODS and "rk4" not in ADAPTIVE_METHODS


@pytest.mark.parametrize("adjoint", [True, False])
def test_step_limit_is_a_recorded_failure_not_an_exception(adjoint):
    model = _small_model("anode", adjoint=adjoint, tol=1e-12, max_num_steps=2, on_failure="ignore")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # the loop keeps going
        logits = model(torch.rand(3, 1, 5, 5))
        loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(logits).all()
        (stats,) = model.solver_stats()
        assert stats.forward.num_failed == 3 and stats.forward.max_iter == 2
        assert 0.0 < stats.forward.max_residual <= 1.0  # fraction of [0, 1] not integrated
        assert stats.backward is not None
        if adjoint:  # no valid adjoint after a failed forward solve: zero ODE gradient
            assert stats.backward.num_failed == 3 and stats.backward.iterations == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_failure_policies():
    x = torch.rand(2, 1, 5, 5)
    warn = _small_model("node", adjoint=False, tol=1e-12, max_num_steps=1, on_failure="warn")
    with pytest.warns(ConvergenceWarning, match="forward solve failed"):
        warn(x)
    strict = _small_model("node", adjoint=True, tol=1e-12, max_num_steps=1, on_failure="raise")
    with pytest.raises(ConvergenceError, match="max_num_steps"):
        strict(x)


class _Fuse(nn.Module):
    """Dynamics that fail (like a torchdiffeq assert) from a given evaluation on."""

    def __init__(self, inner: nn.Module, fail_from: int) -> None:
        super().__init__()
        self.inner, self.fail_from, self.calls = inner, fail_from, 0

    def forward(self, t, h):
        self.calls += 1
        if self.calls >= self.fail_from:
            raise AssertionError("max_num_steps exceeded (simulated)")
        return self.inner(t, h)


def test_mid_interval_failure_returns_last_accepted_state_with_gradient():
    torch.manual_seed(0)
    fuse = _Fuse(ConvODEFunc(2, 3), fail_from=15)  # 2 probes + 2 full dopri5 steps succeed
    block = ODEBlock(fuse, adjoint=False, rtol=1e-6, atol=1e-6, on_failure="ignore")
    h0 = torch.rand(2, 2, 4, 4)
    h_end = block(h0)
    fwd = block.last_stats.forward
    assert fwd.iterations == 15 and fwd.num_failed == 2
    assert 0.0 < fwd.max_residual < 1.0  # it got somewhere inside (0, 1)
    assert not torch.equal(h_end, h0)
    h_end.sum().backward()
    assert fuse.inner.conv2.weight.grad.abs().sum() > 0  # gradient of the truncated flow
    bwd = block.last_stats.backward
    assert bwd.iterations > 0 and bwd.all_converged  # the failure is counted once, forward


def test_adjoint_backward_failure_gives_zero_ode_gradient_and_is_recorded():
    torch.manual_seed(0)
    probe = ODEBlock(ConvODEFunc(2, 3), adjoint=True)
    h0 = torch.rand(2, 2, 4, 4)
    probe(h0)
    forward_nfe = probe.last_stats.forward.iterations
    fuse = _Fuse(probe.func, fail_from=forward_nfe + 3)  # fails inside the adjoint solve
    block = ODEBlock(fuse, adjoint=True, on_failure="warn")
    head = nn.Linear(2 * 16, 1)
    loss = head(block(h0).flatten(1)).sum()
    assert block.last_stats.forward.all_converged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.backward()  # does not raise
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    bwd = block.last_stats.backward
    assert bwd.num_failed == 2 and bwd.solver == "dopri5/adjoint"
    assert all(torch.count_nonzero(p.grad) == 0 for p in fuse.inner.parameters())
    assert head.weight.grad.abs().sum() > 0


class _Broken(nn.Module):
    def forward(self, t, h):
        raise RuntimeError("shape bug in user dynamics")


@pytest.mark.parametrize("adjoint", [True, False])
def test_errors_that_are_not_solver_failures_propagate(adjoint):
    block = ODEBlock(_Broken(), adjoint=adjoint, on_failure="ignore")
    with pytest.raises(RuntimeError, match="shape bug"):
        block(torch.rand(1, 1, 3, 3, requires_grad=True))


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_small_preset_trains_one_step(name):
    spec = MODEL_SPECS[name]
    model = spec.factory((1, 28, 28), 10, **spec.presets["small"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_optimizer_step()
    (stats,) = model.solver_stats()
    assert stats.forward.all_converged and stats.backward.iterations > 0


def test_input_shape_is_checked():
    model = build_node((1, 5, 5), 3, hidden=2)
    with pytest.raises(ValueError, match=r"expected inputs of shape \[B, 1, 5, 5\]"):
        model(torch.rand(2, 1, 6, 6))


BASELINE_NAMES = ["node", "anode", "deq-linear", "deq-single-conv", "deq-multi-conv"]


def test_discovered_through_the_entry_point():
    from pcdeq_plugin.plugins import reset_plugins

    reset_plugins()  # default entry-point discovery, fresh registries
    assert set(BASELINE_NAMES) <= set(pcdeq_plugin.list_models())
    records = {r.name: r for r in pcdeq_plugin.plugin_report()}
    record = records["pcdeq_baselines"]
    assert record.source == "entry point" and record.status == "loaded", record.errors
    assert set(BASELINE_NAMES) <= set(record.provides["model"])
    assert pcdeq_plugin.registry.MODELS.provider("node") == "pcdeq_baselines"


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_built_by_name_through_the_registry(name):
    model = pcdeq_plugin.build_model(name, (1, 28, 28), 10, preset="small")
    assert model.family == {"node": "node", "anode": "anode"}.get(name, "deq")
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert all(s.forward is not None and s.forward.iterations > 0 for s in model.solver_stats())
