"""pcDEQ blocks: the theory's properties for every catalogue activation, both block kinds
(linear, conv) and both variants; implicit gradients; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import pcdeq_plugin as P
from pcdeq_plugin.activations import BUILTIN_ACTIVATIONS
from pcdeq_plugin.cells import PcDEQBlock, PcDEQConv, PcDEQLinear
from pcdeq_plugin.certificates import thompson_distance

ACTS = sorted(BUILTIN_ACTIVATIONS)
POSITIVE = [n for n in ACTS if BUILTIN_ACTIVATIONS[n].kind == "positive"]
KINDS = ("linear", "conv")


def make_block(kind: str, act: str, *, n: int = 4, scale: float = 0.5, **kwargs) -> PcDEQBlock:
    """A float64 block with a random W >= 0 whose largest row sum (operator inf-norm) is ``scale``."""
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    kwargs.setdefault("config", P.SolverConfig(tol=1e-12, max_iter=3000))
    block = cls(n, activation=act, constraint="clamp", **kwargs).double()
    with torch.no_grad():
        w = block.operator.parametrizations.weight.original
        w.copy_(torch.rand_like(w))
        w.mul_(scale / w.flatten(1).sum(dim=1).max())
    return block


def pre_injection(kind: str, n: int = 4, batch: int = 3) -> torch.Tensor:
    shape = (batch, n) if kind == "linear" else (batch, n, 5, 5)
    return torch.randn(shape, dtype=torch.float64)


def iterate(block: PcDEQBlock, z: torch.Tensor, u: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        w = block.weight
        for _ in range(steps):
            z = block.cell(z, u, w)
    return z


def upper_start(block: PcDEQBlock, u: torch.Tensor) -> torch.Tensor:
    bound = block.activation.upper_bound
    return torch.full_like(u, bound if math.isfinite(bound) else 50.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("scale", [0.5, 5.0])
def test_same_fixed_point_from_any_start(kind: str, act: str, scale: float) -> None:
    block = make_block(kind, act, scale=scale)
    pre = pre_injection(kind) + 0.5  # keeps u away from 0 so 600 steps reach 1e-12
    u = block.injection(pre)
    starts = [torch.zeros_like(u), upper_start(block, u), 10 * torch.rand_like(u)]
    ends = [iterate(block, z0, u, 600) for z0 in starts]
    for end in ends[1:]:
        torch.testing.assert_close(end, ends[0], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        z = block(pre)
    torch.testing.assert_close(z, ends[0], rtol=1e-9, atol=1e-11)
    assert block.last_stats.forward.all_converged
    assert (z > 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
def test_monotone_iterates(kind: str, act: str) -> None:
    block = make_block(kind, act, scale=2.0)
    u = block.injection(pre_injection(kind))
    with torch.no_grad():
        w = block.weight
        lo, hi = torch.zeros_like(u), upper_start(block, u)
        bounded = math.isfinite(block.activation.upper_bound)
        for _ in range(40):
            new_lo = block.cell(lo, u, w)
            assert (new_lo >= lo * (1 - 1e-14)).all(), "iterates from 0 must be nondecreasing"
            lo = new_lo
            if bounded:
                new_hi = block.cell(hi, u, w)
                assert (new_hi <= hi * (1 + 1e-14)).all(), "iterates from M*1 must be nonincreasing"
                assert (lo <= new_hi * (1 + 1e-14)).all()
                hi = new_hi


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
def test_monotone_and_strictly_scalable(kind: str, act: str) -> None:
    block = make_block(kind, act, scale=3.0)
    u = block.injection(pre_injection(kind, batch=8))
    with torch.no_grad():
        w = block.weight
        a = 3 * torch.rand_like(u)
        b = a + torch.rand_like(u)
        assert (block.cell(a, u, w) <= block.cell(b, u, w)).all()
        for alpha in (1.01, 1.5, 4.0, 20.0):
            gap = alpha * block.cell(a, u, w) - block.cell(alpha * a, u, w)
            assert (gap > 0).all(), f"strict scalability failed for alpha={alpha}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
def test_thompson_contraction_bound(kind: str, act: str) -> None:
    """d_T(g a, g b) <= log(lambda - (lambda - 1) gamma) <= d_T(a, b)  (pcdeq.md 1.7)."""
    for scale in (0.05, 1.0, 20.0):
        block = make_block(kind, act, scale=scale)
        u = block.injection(pre_injection(kind, batch=16))
        with torch.no_grad():
            w = block.weight
            g0 = block.cell(torch.zeros_like(u), u, w)
            a = torch.exp(4 * torch.rand_like(u) - 3)
            b = a * torch.exp(2 * torch.rand_like(u) - 1)
            ga, gb = block.cell(a, u, w), block.cell(b, u, w)
            d = thompson_distance(a, b)
            lam = torch.exp(d)
            gamma = torch.minimum(g0 / ga, g0 / gb).flatten(1).amin(dim=1)
            bound = torch.log(lam - (lam - 1) * gamma)
            d_next = thompson_distance(ga, gb)
            assert (d_next <= bound + 1e-12).all()
            assert (bound < d).all()  # a strict contraction since gamma > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", POSITIVE)
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 10.0, 1e3])
def test_positive_activation_converges_within_17_iterations(
    kind: str, act: str, scale: float
) -> None:
    """sigma(0)/sup sigma = 1/2 gives a rate <= 1/2 whatever W >= 0: 17 iterations at 1e-4."""
    config = P.SolverConfig(tol=1e-4, max_iter=200)
    block = make_block(kind, act, n=6, scale=scale, config=config).float()
    with torch.no_grad():  # a generic random W >= 0 (not row-normalised) at this scale
        w = block.operator.parametrizations.weight.original
        w.copy_(scale * torch.rand_like(w) ** 3)
    with torch.no_grad():
        block(4 * pre_injection(kind, n=6, batch=32).float())
    stats = block.last_stats.forward
    assert stats.all_converged
    assert stats.iterations <= 17


def _unrolled(block: PcDEQBlock, pre: torch.Tensor, steps: int) -> torch.Tensor:
    u = block.injection(pre)
    w = block.weight
    z = torch.zeros_like(u)
    for _ in range(steps):
        z = block.cell(z, u, w)
    return z


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_implicit_gradient_matches_unrolled(kind: str, act: str) -> None:
    block = make_block(kind, act, n=3, scale=0.6)
    pre = (pre_injection(kind, n=3, batch=2) + 0.5).requires_grad_()
    target = torch.randn_like(pre)
    z = block(pre)
    (z * target).sum().backward()
    implicit = [pre.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    assert block.last_stats.backward is not None and block.last_stats.backward.all_converged
    pre.grad = None
    block.zero_grad()
    (_unrolled(block, pre, 300) * target).sum().backward()
    unrolled = [pre.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_tiny_cell(kind: str, variant: int) -> None:
    """gradcheck w.r.t. the input and the weight-norm tensors g and v (float64)."""
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    block = cls(2, variant=variant, config=P.SolverConfig(tol=1e-13, max_iter=2000)).double()
    with torch.no_grad():  # a W big enough for a non-trivial Jacobian
        block.operator.parametrizations.weight.original0.fill_(0.4)
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]
    pre = torch.randn((2, 2) if kind == "linear" else (1, 2, 3, 3), dtype=torch.float64) + 0.3
    pre.requires_grad_()

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (pre, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_computed_once_per_solve(kind: str) -> None:
    cls = PcDEQLinear if kind == "linear" else PcDEQConv
    block = cls(4)  # the paper's weight norm
    with torch.no_grad():
        block.operator.parametrizations.weight.original0.fill_(0.3)
    calls = []
    param = block.operator.parametrizations.weight[0]
    handle = param.register_forward_hook(lambda *a: calls.append(1))
    pre = pre_injection(kind).float().requires_grad_()
    z = block(pre)
    z.sum().backward()
    handle.remove()
    assert block.last_stats.forward.iterations > 2
    assert len(calls) == 1, "W must be computed once per solve (parametrize.cached)"
    assert pre.grad is not None and torch.isfinite(pre.grad).all()


def test_injection_maps_and_defaults() -> None:
    b1, b2 = PcDEQLinear(3), PcDEQLinear(3, variant=2)
    assert (b1.variant, b1.activation.name, b1.beta) == (1, "tanh", 5.0)
    assert (b2.variant, b2.activation.name) == (2, "sigmoid")
    assert PcDEQLinear(3, activation="hardsigmoid").variant == 2  # inferred from the kind
    x = torch.linspace(-3, 3, 12).view(4, 3)
    torch.testing.assert_close(b1.injection(x), F.softplus(x, beta=5))
    assert (b1.injection(x) > 0).all()
    torch.testing.assert_close(b2.injection(x), F.relu(x))
    b3 = PcDEQLinear(3, beta=2.0)
    torch.testing.assert_close(b3.injection(x), F.softplus(x, beta=2))
    floored = PcDEQLinear(3, injection_floor=0.01)
    torch.testing.assert_close(floored.injection(x), F.softplus(x, beta=5) + 0.01)
    assert (floored.injection(torch.full((1, 3), -1e4)) == 0.01).all()  # softplus underflow


def test_injection_floor_bounds_kappa() -> None:
    """With u >= eps, kappa >= sigma(eps)/M stays away from 0 where softplus underflows."""
    from pcdeq_plugin.certificates import certify

    x = torch.full((2, 4), -30.0, dtype=torch.float64)
    plain = make_block("linear", "tanh", scale=2.0)
    floored = make_block("linear", "tanh", scale=2.0, injection_floor=0.05)
    floored.load_state_dict(plain.state_dict())
    assert certify(plain, x).kappa < 1e-30
    cert = certify(floored, x)
    assert cert.ok and cert.kappa >= math.tanh(0.05) - 1e-12


def test_stats_and_no_graph_in_eval() -> None:
    block = PcDEQConv(3, variant=2)
    pre = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        z = block(pre)
    assert not z.requires_grad
    assert block.last_stats.forward.iterations >= 1 and block.last_stats.backward is None
    z = block(pre)
    z.sum().backward()
    assert block.last_stats.backward.iterations >= 1
    assert block.last_stats.forward.residual.shape == (2,)


def test_after_optimizer_step_projects() -> None:
    block = PcDEQLinear(4)
    with torch.no_grad():
        block.operator.parametrizations.weight.original1.sub_(1.0)
    assert (block.weight < 0).any()
    block.after_optimizer_step()
    assert (block.weight >= 0).all() or torch.isnan(block.weight).any()
    assert (block.operator.parametrizations.weight.original1 >= 0).all()


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_input_is_refused(kind: str, bad: float) -> None:
    block = make_block(kind, "tanh")
    pre = pre_injection(kind)
    pre.view(-1)[3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        block(pre)


def test_wrong_shapes_are_refused() -> None:
    lin, conv = PcDEQLinear(4), PcDEQConv(4)
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, 4\].*flatten"):
        lin(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, 4\], got \[2, 5\]"):
        lin(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, 4, height, width\], got \[2, 3, 5, 5\]"):
        conv(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"height, width\], got \[2, 4\]"):
        conv(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        lin(torch.ones(2, 4, dtype=torch.long))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(P.UnknownNameError, match="unknown activation 'foo'; available: .*tanh"):
        PcDEQLinear(3, activation="foo")
    with pytest.raises(ValueError, match="use variant 2"):
        PcDEQLinear(3, variant=1, activation="sigmoid")
    with pytest.raises(ValueError, match="choose 1 or 2"):
        PcDEQConv(3, variant=3)
    with pytest.raises(ValueError, match="unknown constraint 'abs'; available: clamp, "):
        PcDEQLinear(3, constraint="abs")
    with pytest.raises(ValueError, match="beta"):
        PcDEQLinear(3, beta=0)
    with pytest.raises(ValueError, match="injection_floor"):
        PcDEQLinear(3, injection_floor=-1.0)
    with pytest.raises(ValueError, match="features"):
        PcDEQLinear(0)
    with pytest.raises(ValueError, match="odd"):
        PcDEQConv(3, kernel_size=2)
    with pytest.raises(TypeError, match="SolverConfig"):
        PcDEQLinear(3, config={"tol": 1e-3})
    with pytest.raises(TypeError, match="check_inputs must be True or False, got 'no'"):
        PcDEQLinear(3, check_inputs="no")  # type: ignore[arg-type]
    # solver names and options are resolved at construction, not at the first forward
    with pytest.raises(P.UnknownNameError, match="SolverConfig.solver: unknown solver 'newtn'"):
        PcDEQConv(3, config=P.SolverConfig(solver="newtn"))
    with pytest.raises(TypeError, match=r"SolverConfig.solver_options: .*\['memroy'\]"):
        PcDEQLinear(3, config=P.SolverConfig(solver="anderson", solver_options={"memroy": 2}))


def test_cached_context_is_left() -> None:
    block = PcDEQLinear(3)
    block(torch.randn(2, 3))
    assert not parametrize._cache_enabled  # the solve does not leak the cache
