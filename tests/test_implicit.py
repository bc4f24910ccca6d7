"""solve_implicit: implicit gradients, memory, graph hygiene, statistics, failure policy, AMP."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from solver_zoo import PCDEQ_PROBLEMS, ZOO, dense_tanh

from pcdeq_plugin import (
    BlockStats,
    ConvergenceError,
    ConvergenceWarning,
    SolverConfig,
    UnknownNameError,
)
from pcdeq_plugin.implicit import enforce_failure_policy, make_solvers, solve_implicit

TIGHT = SolverConfig(tol=1e-13, max_iter=2000, on_failure="raise")


def unrolled(f, z0: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: autograd straight through ``steps`` plain iterations."""
    z = z0
    for _ in range(steps):
        z = f(z)
    return z


def grads(problem, z: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((z * weight).sum(), problem.params))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("problem_name", sorted(ZOO))
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_implicit_gradient_equals_unrolled_autograd(float64, problem_name, solver):
    problem = ZOO[problem_name]().requires_grad_()
    weight = torch.randn(problem.state_shape)
    config = TIGHT.replace(solver=solver)
    stats = BlockStats(problem_name)
    z = solve_implicit(problem.map(), problem.zeros(), config, stats)
    implicit = grads(problem, z, weight)
    reference = grads(problem, unrolled(problem.map(), problem.zeros(), 400), weight)
    for got, want in zip(implicit, reference):
        assert rel_err(got, want) < 1e-8
    assert stats.forward.all_converged and stats.backward.all_converged


def test_gradcheck_through_the_solve(float64):
    problem = dense_tanh(batch=2, n=3)
    w, x = (p.clone().requires_grad_() for p in problem.params)

    def fn(w, x):
        return solve_implicit(problem.make_map(w, x), torch.zeros(2, 3), TIGHT)

    assert torch.autograd.gradcheck(fn, (w, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_also_reaches_a_closed_over_module(float64):
    torch.manual_seed(3)
    lin = torch.nn.Linear(4, 5)
    w = torch.rand(5, 5) * 0.1
    x = torch.randn(3, 4)
    loss_weight = torch.randn(3, 5)

    def make_map():
        u = F.softplus(lin(x), beta=5)
        return lambda z: torch.tanh(z @ w.T + u)

    z = solve_implicit(make_map(), torch.zeros(3, 5), TIGHT)
    got = torch.autograd.grad((z * loss_weight).sum(), list(lin.parameters()))
    want = torch.autograd.grad(
        (unrolled(make_map(), torch.zeros(3, 5), 200) * loss_weight).sum(), list(lin.parameters())
    )
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-9


def test_same_block_twice_in_one_graph(float64):
    problem = dense_tanh(batch=2, n=4).requires_grad_()
    w, x = problem.params
    v = torch.rand(4, 4, requires_grad=True)

    def forward(solve):
        z1 = solve(problem.make_map(w, x))
        z2 = solve(problem.make_map(w, z1 @ v - 1.0))  # same W, injection from z1
        return (z1.sum() + (z2**2).sum()) / 2

    implicit = torch.autograd.grad(
        forward(lambda f: solve_implicit(f, torch.zeros(2, 4), TIGHT)), (w, x, v)
    )
    reference = torch.autograd.grad(
        forward(lambda f: unrolled(f, torch.zeros(2, 4), 300)), (w, x, v)
    )
    for got, want in zip(implicit, reference):
        assert rel_err(got, want) < 1e-9


def test_retain_graph_second_backward_gives_the_same_gradient(float64):
    problem = dense_tanh().requires_grad_()
    z = solve_implicit(problem.map(), problem.zeros(), TIGHT)
    loss = (z**2).sum()
    first = torch.autograd.grad(loss, problem.params, retain_graph=True)
    second = torch.autograd.grad(loss, problem.params)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_is_refused_clearly():
    problem = dense_tanh().requires_grad_()
    z = solve_implicit(problem.map(), problem.zeros(), SolverConfig(), BlockStats("layer3"))
    with pytest.raises(RuntimeError, match="layer3: double backward"):
        torch.autograd.grad(z.sum(), problem.params, create_graph=True)


def test_a_map_that_ignores_its_state_passes_the_gradient_through(float64):
    x = torch.randn(2, 3, requires_grad=True)
    z = solve_implicit(lambda z: torch.sigmoid(x), torch.zeros(2, 3), TIGHT)
    (g,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(x) * (1 - torch.sigmoid(x)))


# -- memory and graph hygiene -------------------------------------------------------------


def count_saved_tensors(fn) -> int:
    """Tensors autograd saves for backward while ``fn`` runs."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_graph_size_does_not_grow_with_the_number_of_iterations(solver):
    problem = dense_tanh().requires_grad_()
    config = SolverConfig(solver=solver, tol=1e-30, on_failure="ignore")

    stats = BlockStats("grow")

    def run(iterations):
        # checking only at the cap forces exactly `iterations` steps
        capped = config.replace(max_iter=iterations, check_every=iterations)
        saved = count_saved_tensors(
            lambda: solve_implicit(problem.map(), problem.zeros(), capped, stats)
        )
        assert stats.forward.iterations == iterations
        return saved

    few, many = run(5), run(60)
    assert few == many > 0
    # the instrument does see graphs that grow: unrolling saves per iteration
    assert count_saved_tensors(lambda: unrolled(problem.map(), problem.zeros(), 60)) > 10 * few


@pytest.mark.parametrize("reuse_step_graph", [False, True])
def test_vjp_graph_is_freed_after_backward(reuse_step_graph):
    problem = dense_tanh().requires_grad_()
    f = problem.map()
    outputs: list[weakref.ref] = []

    def tracked(z):
        out = f(z)
        if torch.is_grad_enabled():
            outputs.append(weakref.ref(out))
        return out

    config = SolverConfig(tol=1e-8, reuse_step_graph=reuse_step_graph)
    z = solve_implicit(tracked, problem.zeros(), config)
    (z**2).sum().backward()
    gc.collect()
    # (the merged step returns an alias of its output: that tensor lives as long as z)
    alive = [r() for r in outputs if r() is not None and r() is not z and r() is not z._base]
    if reuse_step_graph:  # the differentiable step's graph also serves the VJPs
        assert len(outputs) == 1
    else:
        assert len(outputs) >= 2  # the differentiable step, and the VJP graph built in backward
    assert alive == []


@pytest.mark.parametrize("problem_name", PCDEQ_PROBLEMS)
def test_no_graph_without_grad(problem_name):
    problem = ZOO[problem_name]().requires_grad_()
    stats = BlockStats("eval")
    with torch.no_grad():
        saved = count_saved_tensors(
            lambda: solve_implicit(problem.map(), problem.zeros(), SolverConfig(), stats)
        )
        z = solve_implicit(problem.map(), problem.zeros(), SolverConfig(), stats)
    assert saved == 0
    assert z.grad_fn is None and not z.requires_grad
    assert stats.forward is not None and stats.backward is None


def test_no_graph_when_nothing_requires_grad():
    problem = dense_tanh()  # leaves do not require grad
    z = solve_implicit(problem.map(), problem.zeros(), SolverConfig())
    assert z.grad_fn is None and not z.requires_grad


# -- statistics ------------------------------------------------------------------------------


def test_forward_and_backward_statistics_are_recorded(float64):
    problem = dense_tanh().requires_grad_()
    config = SolverConfig(
        solver="anderson",
        backward_solver="fixed_point",
        tol=1e-9,
        max_iter=300,
        backward_tol=1e-7,
        backward_max_iter=150,
        solver_options={"memory": 3},  # forward only: fixed_point takes no options
    )
    stats = BlockStats("blk")
    z = solve_implicit(problem.map(), problem.zeros(), config, stats)
    assert stats.forward.solver == "anderson" and stats.backward is None
    assert stats.forward.max_iter == 300 and stats.forward.all_converged
    assert float(stats.forward.residual.max()) < 1e-9
    z.sum().backward()
    back = stats.backward
    assert back.solver == "fixed_point" and back.max_iter == 150 and back.unit == "iter"
    assert back.all_converged and float(back.residual.max()) < 1e-7
    assert back.residual.shape == (problem.state_shape[0],) and back.iterations >= 1
    assert back.seconds > 0
    # a new forward resets the stale backward record
    solve_implicit(problem.map(), problem.zeros(), config, stats)
    assert stats.backward is None


def test_make_solvers_uses_the_configured_names():
    forward, backward = make_solvers(SolverConfig(solver="anderson", solver_options={"memory": 7}))
    assert forward.name == backward.name == "anderson"
    assert forward.memory == backward.memory == 7
    with pytest.raises(UnknownNameError, match="unknown solver 'newton'; available: .*fixed_point"):
        make_solvers(SolverConfig(solver="newton"))


# -- failure policy --------------------------------------------------------------------------


def capped_config(on_failure: str, **changes) -> SolverConfig:
    return SolverConfig(tol=1e-12, max_iter=3, on_failure=on_failure, **changes)


def test_forward_failure_policy_ignore_records_silently():
    problem = dense_tanh()
    stats = BlockStats("quiet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_implicit(problem.map(), problem.zeros(), capped_config("ignore"), stats)
    assert stats.forward.iterations == 3 and stats.forward.num_failed == 3


def test_forward_failure_policy_warn_names_block_iterations_residual_and_count():
    problem = dense_tanh()
    with pytest.warns(ConvergenceWarning) as record:
        solve_implicit(problem.map(), problem.zeros(), capped_config("warn"), BlockStats("cell0"))
    message = str(record[0].message)
    assert "cell0: forward solve (fixed_point)" in message
    assert "3/3 samples after 3 iterations" in message
    assert "worst residual" in message and "max_iter=3" in message


def test_forward_failure_policy_raise():
    problem = dense_tanh()
    with pytest.raises(ConvergenceError, match="cell1: forward solve .* 3/3 samples"):
        solve_implicit(problem.map(), problem.zeros(), capped_config("raise"), BlockStats("cell1"))


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_backward_failure_policy(policy):
    problem = dense_tanh().requires_grad_()
    config = SolverConfig(tol=1e-6, max_iter=200, backward_max_iter=1, on_failure=policy)
    stats = BlockStats("cell2")
    z = solve_implicit(problem.map(), problem.zeros(), config, stats)
    expected = ConvergenceWarning if policy == "warn" else ConvergenceError
    context = pytest.warns(expected) if policy == "warn" else pytest.raises(expected)
    with context as info:
        z.sum().backward()
    text = str(info[0].message) if policy == "warn" else str(info.value)
    assert "cell2: backward solve" in text and "after 1 iterations" in text
    assert stats.backward is not None and stats.backward.num_failed == 3


def test_nan_is_reported_as_non_finite():
    problem = dense_tanh()
    z0 = problem.zeros()
    z0[0, 0] = math.nan
    stats = BlockStats("nan_block")
    with pytest.raises(ConvergenceError, match="1/3 samples.*non-finite values \\(NaN/Inf\\)"):
        solve_implicit(problem.map(), z0, SolverConfig(on_failure="raise"), stats)
    assert stats.forward.converged.tolist() == [False, True, True]


def test_enforce_failure_policy_rejects_unknown_policy():
    problem = dense_tanh()
    stats = BlockStats("x")
    solve_implicit(problem.map(), problem.zeros(), SolverConfig(), stats)
    with pytest.raises(ValueError, match="unknown on_failure 'loud'; available:"):
        enforce_failure_policy(stats.forward, "loud")


def test_bad_arguments_are_named():
    problem = dense_tanh()
    with pytest.raises(TypeError, match="config must be a SolverConfig"):
        solve_implicit(problem.map(), problem.zeros(), {"tol": 1e-4})
    with pytest.raises(TypeError, match="floating-point"):
        solve_implicit(problem.map(), torch.zeros(3, 6, dtype=torch.int64), SolverConfig())


# -- mixed precision -------------------------------------------------------------------------


def test_autocast_solves_in_float32_below_half_precision_resolution():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    w = (torch.rand(6, 6) * 0.15).requires_grad_()
    x = torch.randn(4, 6)
    config = SolverConfig(tol=1e-6, on_failure="raise")
    stats = BlockStats("amp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = F.softplus(lin(x), beta=5)
        assert u.dtype == torch.bfloat16
        z = solve_implicit(lambda z: torch.tanh(z @ w.T + u), torch.zeros(4, 6), config, stats)
    assert z.dtype == torch.float32
    assert float(stats.forward.residual.max()) < 1e-6  # unreachable in bfloat16 (spacing ~4e-3)
    u32 = u.detach().float()
    ref = solve_implicit(lambda z: torch.tanh(z @ w.T + u32), torch.zeros(4, 6), config)
    torch.testing.assert_close(z.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    z.sum().backward()
    assert stats.backward.all_converged
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())


def test_half_precision_start_is_solved_in_float32():
    problem = dense_tanh()
    z = solve_implicit(problem.map(), problem.zeros().half(), SolverConfig(tol=1e-6))
    assert z.dtype == torch.float32
