"""Where ``J^T y`` comes from (issue 9): the merged step (the differentiable step's graph
also serves the VJPs), the rebuilt graph (the paper's recipe) and the analytic adjoint of
pcDEQ cells, ``W^T (sigma'(a) * y)``. Each gives the unrolled-autograd gradients in
float64, keeps memory flat in the number of iterations, and evaluates the map as often as
it says."""

from __future__ import annotations

import pytest
import torch
from solver_zoo import PCDEQ_PROBLEMS, ZOO, dense_tanh
from speed_support import float64_block, instrument, pre_injection, rel_err, unrolled_block
from test_implicit import count_saved_tensors, unrolled

import pcdeq_plugin as P
from pcdeq_plugin.cell_map import activation_slope
from pcdeq_plugin.implicit import solve_implicit
from pcdeq_plugin.maps import FixedPointMap

TIGHT = P.SolverConfig(tol=1e-13, max_iter=2000, on_failure="raise")
ACTIVATIONS = P.list_activations()
KINDS = ("linear", "conv")


class CountingMap:
    """A plain callable (not a FixedPointMap) that counts its evaluations."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(z)


# -- the merged step (plain callables) -------------------------------------------------------


@pytest.mark.parametrize("reuse_step_graph", [True, False])
def test_training_step_evaluates_a_plain_map_once_more_than_its_iterations(
    float64, reuse_step_graph: bool
) -> None:
    problem = dense_tanh().requires_grad_()
    f = CountingMap(problem.map())
    stats = P.BlockStats("count")
    config = TIGHT.replace(reuse_step_graph=reuse_step_graph)
    z = solve_implicit(f, problem.zeros(), config, stats)
    assert f.calls == stats.forward.iterations + 1  # the solve, then one differentiable step
    f.calls = 0
    (z**2).sum().backward()
    assert stats.backward.iterations > 3 and stats.backward.all_converged
    # the merged step's graph serves every VJP; the paper's recipe builds a second one
    assert f.calls == (0 if reuse_step_graph else 1)


@pytest.mark.parametrize("problem_name", [*PCDEQ_PROBLEMS, "linear_contraction"])
def test_merged_step_gradients_equal_the_rebuilt_graph_and_unrolled(float64, problem_name) -> None:
    problem = ZOO[problem_name]().requires_grad_()
    weight = torch.randn(problem.state_shape)

    def gradients(z: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad((z * weight).sum(), problem.params))

    merged = gradients(solve_implicit(problem.map(), problem.zeros(), TIGHT))
    rebuilt = gradients(
        solve_implicit(problem.map(), problem.zeros(), TIGHT.replace(reuse_step_graph=False))
    )
    reference = gradients(unrolled(problem.map(), problem.zeros(), 400))
    for a, b, want in zip(merged, rebuilt, reference):
        assert rel_err(a, b) < 1e-12  # the same VJPs at the same z*, from another graph
        assert rel_err(a, want) < 1e-8


@pytest.mark.parametrize("reuse_step_graph", [True, False])
def test_gradcheck_through_both_autograd_adjoints(float64, reuse_step_graph: bool) -> None:
    problem = dense_tanh(batch=2, n=3)
    w, x = (p.clone().requires_grad_() for p in problem.params)
    config = TIGHT.replace(reuse_step_graph=reuse_step_graph)

    def fn(w, x):
        return solve_implicit(problem.make_map(w, x), torch.zeros(2, 3), config)

    assert torch.autograd.gradcheck(fn, (w, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def _capped(config: P.SolverConfig, iterations: int) -> P.SolverConfig:
    # checking only at the cap forces exactly `iterations` steps
    return config.replace(
        tol=1e-30, max_iter=iterations, check_every=iterations, on_failure="ignore"
    )


@pytest.mark.parametrize("reuse_step_graph", [True, False])
def test_memory_does_not_grow_with_iterations_plain_map(reuse_step_graph: bool) -> None:
    problem = dense_tanh().requires_grad_()
    config = P.SolverConfig(reuse_step_graph=reuse_step_graph)
    stats = P.BlockStats("grow")

    def saved(iterations: int) -> int:
        capped = _capped(config, iterations)

        def train_step() -> None:
            z = solve_implicit(problem.map(), problem.zeros(), capped, stats)
            (z**2).sum().backward()

        count = count_saved_tensors(train_step)
        assert stats.forward.iterations == iterations
        return count

    assert saved(4) == saved(50) > 0


@pytest.mark.parametrize("adjoint", ["analytic", "autograd"])
def test_memory_does_not_grow_with_iterations_pcdeq_block(adjoint: str) -> None:
    block = P.PcDEQConv(4, init_scale=0.05)
    pre = torch.randn(2, 4, 5, 5, requires_grad=True)

    def saved(iterations: int) -> int:
        block.config = _capped(P.SolverConfig(adjoint=adjoint, warm_start="off"), iterations)
        count = count_saved_tensors(lambda: block(pre).sum().backward())
        assert block.last_stats.forward.iterations == iterations
        assert block.last_stats.backward.iterations == iterations
        return count

    assert saved(4) == saved(40) > 0


@pytest.mark.parametrize("reuse_step_graph", [True, False])
def test_a_map_closing_over_nothing_that_requires_grad_returns_no_graph(
    reuse_step_graph: bool,
) -> None:
    problem = dense_tanh()  # its tensors do not require grad
    config = P.SolverConfig(tol=1e-8, reuse_step_graph=reuse_step_graph)
    z = solve_implicit(problem.map(), problem.zeros(), config)
    assert not z.requires_grad and z.grad_fn is None
    with torch.no_grad():
        plain = solve_implicit(problem.map(), problem.zeros(), config)
    assert torch.equal(z, plain)  # the solve's own answer, not a later evaluation
    frozen = P.PcDEQLinear(4).requires_grad_(False)
    out = frozen(torch.randn(3, 4))
    assert not out.requires_grad and out.grad_fn is None


# -- the analytic adjoint of pcDEQ cells -----------------------------------------------------


def _gradients(block, run, pre: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``<run(x), target>`` for the input and ``block``'s parameters."""
    x = pre.clone().requires_grad_()
    block.zero_grad()
    (run(x) * target).sum().backward()
    return [x.grad, *(p.grad.clone() for p in block.parameters())]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_analytic_adjoint_equals_autograd_and_unrolled(kind: str, activation: str) -> None:
    analytic = float64_block(kind, activation, adjoint="analytic")
    autograd = float64_block(kind, activation, adjoint="autograd")
    autograd.load_state_dict(analytic.state_dict())
    pre = pre_injection(kind)
    target = torch.randn_like(pre)
    log = instrument(analytic)
    with_analytic = _gradients(analytic, analytic, pre, target)
    assert log.count("adjoint") == analytic.last_stats.backward.iterations > 1  # it ran
    with_autograd = _gradients(autograd, autograd, pre, target)
    with_unrolled = _gradients(analytic, lambda x: unrolled_block(analytic, x), pre, target)
    for got, same, want in zip(with_analytic, with_autograd, with_unrolled):
        assert rel_err(got, same) < 1e-8
        assert rel_err(got, want) < 1e-8


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_slope_equals_the_autograd_derivative(activation: str) -> None:
    fn = P.get_activation(activation).fn
    # negative values too (a violated pcDEQ condition may produce them); random points
    # avoid the kinks of relu6, hardtanh01 and hardsigmoid almost surely
    a = torch.rand(500, dtype=torch.float64) * 11 - 3
    leaf = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    got = activation_slope(fn, a, fn(a))
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


class _PlainStructuredMap(FixedPointMap):
    """A FixedPointMap without an analytic Jacobian (``linearized_step`` returns None)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def test_analytic_adjoint_is_refused_for_maps_without_one() -> None:
    problem = dense_tanh().requires_grad_()
    config = P.SolverConfig(adjoint="analytic")
    for f in (problem.map(), _PlainStructuredMap(problem.map())):
        match = (
            "blk: adjoint='analytic' needs a map with an analytic Jacobian.*'auto' or 'autograd'"
        )
        with pytest.raises(ValueError, match=match):
            solve_implicit(f, problem.zeros(), config, P.BlockStats("blk"))
    with pytest.raises(ValueError, match="adjoint 'exact'.*auto, analytic, autograd"):
        P.SolverConfig(adjoint="exact")


@pytest.mark.parametrize(
    ("adjoint", "reuse_step_graph"),
    [("auto", True), ("analytic", True), ("autograd", True), ("autograd", False)],
)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu6"])
def test_training_step_evaluates_the_cell_at_most_as_often_as_its_iterations(
    activation: str, adjoint: str, reuse_step_graph: bool
) -> None:
    block = float64_block("conv", activation, adjoint=adjoint, reuse_step_graph=reuse_step_graph)
    log = instrument(block)
    pre = pre_injection("conv").requires_grad_()
    z = block(pre)
    forward = block.last_stats.forward
    analytic = adjoint != "autograd"
    # the iterations, of which the first from zero (sigma(u)) needs no evaluation, and the
    # differentiable step, which the analytic adjoint of tanh and sigmoid does not need
    # either (z* is its own output: the slope is a function of it)
    step = 0 if analytic and activation in ("tanh", "sigmoid") else 1
    assert log.count("cell") == forward.iterations - 1 + step
    assert sum(c.grad_enabled for c in log.cell) == step
    loss = (z * z).sum()
    log.clear()
    saved = count_saved_tensors(loss.backward)
    backward = block.last_stats.backward
    assert backward.all_converged and backward.iterations > 1
    assert log.count("adjoint") == (backward.iterations if analytic else 0)
    assert log.count("cell") == (0 if reuse_step_graph else 1)  # the rebuilt graph
    if not analytic or activation in ("tanh", "sigmoid"):
        # no graph inside the backward hook: the analytic slope of tanh and sigmoid comes
        # from the kept output, the merged step differentiates the graph it already has;
        # only the paper's recipe builds one there
        assert (saved == 0) == reuse_step_graph


@pytest.mark.parametrize("kind", KINDS)
def test_weight_gradients_equal_autograd_through_the_linear_map(kind: str) -> None:
    # the dense and conv closed forms against the base class's autograd fallback
    block = float64_block(kind, "tanh")
    pre = pre_injection(kind)
    z, grad = torch.rand_like(pre), torch.randn_like(pre)
    weight = block.weight.detach()
    direct = block.weight_gradient(z, grad, weight)
    fallback = P.PcDEQBlock.weight_gradient(block, z, grad, weight)
    assert direct.shape == weight.shape
    torch.testing.assert_close(direct, fallback, rtol=1e-12, atol=1e-12)
    assert float(direct.abs().max()) > 0


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_the_step_free_output_is_z_star_and_keeps_its_graph_small(activation: str) -> None:
    block = float64_block("conv", activation)
    pre = pre_injection("conv").requires_grad_()
    z = block(pre)
    with torch.no_grad():
        again = block(pre)  # evaluation: the solve's answer, no step
    assert torch.equal(z.detach(), again)  # training returns z* itself, not f(z*)
    assert type(z.grad_fn).__name__ == "_LinearizedFixedPointBackward"
    (grad,) = torch.autograd.grad((z * z).sum(), pre)
    leaf = pre.detach().requires_grad_()
    reference = unrolled_block(block, leaf)
    (want,) = torch.autograd.grad((reference * reference).sum(), leaf)
    assert rel_err(grad, want) < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_the_step_free_output_survives_retain_graph_and_reuse(kind: str) -> None:
    block = float64_block(kind, "tanh")
    pre = pre_injection(kind).requires_grad_()
    z = block(pre)
    loss = (z * z).sum()
    (first,) = torch.autograd.grad(loss, pre, retain_graph=True)
    (second,) = torch.autograd.grad(loss, pre)
    assert torch.equal(first, second)
    # the block twice in one graph: two solves, two independent hooks and Functions
    twice = block(block(pre) * 0.5)
    (grad,) = torch.autograd.grad(twice.sum(), pre)
    leaf = pre.detach().requires_grad_()
    reference = unrolled_block(block, unrolled_block(block, leaf) * 0.5)
    (want,) = torch.autograd.grad(reference.sum(), leaf)
    assert rel_err(grad, want) < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_backward_inside_an_autocast_region_stays_float32(kind: str) -> None:
    # the weight gradient is a matrix product (dense) that autocast would run in bfloat16
    block = (
        P.PcDEQLinear(6, init_scale=0.05) if kind == "linear" else P.PcDEQConv(6, init_scale=0.05)
    )
    pre = pre_injection(kind, n=6, batch=3, dtype=torch.float32).requires_grad_()
    grads = []
    for inside in (False, True):
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (block(pre) ** 2).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for outside, inside in zip(*grads):
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, outside, rtol=1e-6, atol=1e-7)
