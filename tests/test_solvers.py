"""Forward fixed-point solvers: convergence, per-sample statistics, safeguards, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from solver_zoo import PCDEQ_PROBLEMS, ZOO, batched_small_maps, slow_tanh_batch

from pcdeq_plugin import FixedPointResult, SolveStats, UnknownNameError, get_solver, list_solvers
from pcdeq_plugin.registry import SOLVERS
from pcdeq_plugin.solvers import AndersonAcceleration, FixedPointIteration, per_sample_residual

BUILTIN = ("fixed_point", "anderson")


class CountingMap:
    """Wraps a map; counts calls and records the smallest entry of every input."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.input_minima: list[float] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.input_minima.append(float(z.min()))
        return self.fn(z)


# -- the residual -----------------------------------------------------------------------


def test_per_sample_residual_is_relative_and_per_sample():
    z = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    fz = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    r = per_sample_residual(fz, z)
    assert r.shape == (2,)
    assert r[0] == 0
    # zero image: the residual is ||z|| / 1e-8, huge but finite
    assert r[1] == pytest.approx(5.0 / 1e-8)
    with pytest.raises(ValueError, match="shape"):
        per_sample_residual(fz, z[:1])


# -- convergence on the zoo ---------------------------------------------------------------


@pytest.mark.parametrize("problem_name", sorted(ZOO))
@pytest.mark.parametrize("solver_name", BUILTIN)
def test_converges_to_the_true_fixed_point(float64, solver_name, problem_name):
    problem = ZOO[problem_name]()
    fn = CountingMap(problem.map())
    result = get_solver(solver_name)(fn, problem.zeros(), tol=1e-11, max_iter=500)
    assert isinstance(result, FixedPointResult)
    stats = result.stats
    assert isinstance(stats, SolveStats)
    assert stats.all_converged
    assert stats.solver == solver_name and stats.unit == "iter" and stats.max_iter == 500
    assert 1 <= stats.iterations < 500
    assert fn.calls == stats.iterations  # one evaluation per iteration, none hidden
    assert stats.residual.shape == (problem.state_shape[0],)
    assert stats.converged.dtype == torch.bool
    assert float(stats.residual.max()) < 1e-11
    assert stats.seconds > 0
    torch.testing.assert_close(result.value, problem.reference(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver_name", BUILTIN)
@pytest.mark.parametrize("problem_name", PCDEQ_PROBLEMS)
def test_same_fixed_point_from_different_nonnegative_starts(float64, solver_name, problem_name):
    problem = ZOO[problem_name]()
    solver = get_solver(solver_name)
    a = solver(problem.map(), problem.zeros(), tol=1e-12, max_iter=500).value
    b = solver(problem.map(), 5 * torch.rand(problem.state_shape), tol=1e-12, max_iter=500).value
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_plain_iteration_from_zero_is_monotone_on_pcdeq_maps(float64):
    for name in PCDEQ_PROBLEMS:
        problem = ZOO[name]()
        f, z = problem.map(), problem.zeros()
        for _ in range(30):
            nxt = f(z)
            assert bool((nxt >= z - 1e-15).all()), name
            z = nxt


# -- per-sample residuals -------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_one_slow_sample_is_reported_while_the_others_converge(float64, solver_name):
    fn, z0 = slow_tanh_batch((0.5, 0.3, 1e-4))
    # anderson solves the scalar problem quickly, so give it a cap it cannot meet
    cap = 40 if solver_name == "fixed_point" else 4
    result = get_solver(solver_name)(fn, z0, tol=1e-6, max_iter=cap)
    stats = result.stats
    if solver_name == "fixed_point":
        assert stats.converged.tolist() == [True, True, False]
        assert stats.num_failed == 1
        assert float(stats.residual[2]) > 1e-6 > float(stats.residual[:2].max())
    assert not bool(stats.converged[2])
    assert stats.iterations == cap  # the cap was hit, and it shows
    assert not stats.all_converged


def test_batch_solve_equals_per_sample_solves(float64):
    """Finished samples keep their value: batching does not change any sample's answer."""
    fn_batch, z0 = slow_tanh_batch((0.5, 0.05, 0.01))
    solver = FixedPointIteration()
    batch = solver(fn_batch, z0, tol=1e-8, max_iter=2000)
    for i, x in enumerate((0.5, 0.05, 0.01)):
        single = solver(lambda z, x=x: torch.tanh(z + x), z0[:1], tol=1e-8, max_iter=2000)
        torch.testing.assert_close(batch.value[i], single.value[0], rtol=0, atol=1e-15)
        assert float(batch.stats.residual[i]) == pytest.approx(float(single.stats.residual[0]))


# -- check_every and host synchronisation --------------------------------------------------


@pytest.mark.parametrize("solver_name", BUILTIN)
@pytest.mark.parametrize("check_every", [1, 3, 7])
def test_check_every_sets_where_convergence_is_tested(float64, solver_name, check_every):
    problem = ZOO["dense_tanh"]()
    base = get_solver(solver_name)(problem.map(), problem.zeros(), tol=1e-9, max_iter=300)
    fn = CountingMap(problem.map())
    result = get_solver(solver_name)(
        fn, problem.zeros(), tol=1e-9, max_iter=300, check_every=check_every
    )
    n = result.stats.iterations
    assert result.stats.all_converged
    assert n % check_every == 0
    assert base.stats.iterations <= n < base.stats.iterations + check_every
    assert fn.calls == n


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_host_synchronises_only_on_check_steps(monkeypatch, solver_name):
    # a map without a fixed point: every run goes to the cap
    z0 = torch.zeros(3, 4)

    def f(z):
        return z + 1.0

    syncs = {"n": 0}
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item
    original_numpy = torch.Tensor.numpy

    def counting_bool(self):
        syncs["n"] += 1
        return original_bool(self)

    def counting_item(self):
        syncs["n"] += 1
        return original_item(self)

    def counting_numpy(self, *args, **kwargs):
        # the CPU path reads the per-sample norms as one NumPy array per check
        syncs["n"] += 1
        return original_numpy(self, *args, **kwargs)

    solver = get_solver(solver_name)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "numpy", counting_numpy)
    solver(f, z0, tol=1e-6, max_iter=20, check_every=5)
    sparse = syncs["n"]
    syncs["n"] = 0
    solver(f, z0, tol=1e-6, max_iter=20, check_every=1)
    dense = syncs["n"]
    monkeypatch.undo()
    assert 1 <= sparse <= 4  # checks at 5, 10, 15, 20
    assert dense >= 19


# -- Anderson ---------------------------------------------------------------------------------


@pytest.mark.parametrize("problem_name", sorted(ZOO))
@pytest.mark.parametrize(
    "options",
    [{}, {"memory": 1, "beta": 0.5}, {"memory": 2}, {"memory": 8, "beta": 0.7, "lam": 1e-6}],
)
def test_anderson_agrees_with_plain_iteration(float64, problem_name, options):
    problem = ZOO[problem_name]()
    plain = FixedPointIteration()(problem.map(), problem.zeros(), tol=1e-12, max_iter=1000)
    fast = AndersonAcceleration(**options)(problem.map(), problem.zeros(), tol=1e-12, max_iter=1000)
    assert fast.stats.all_converged
    torch.testing.assert_close(fast.value, plain.value, rtol=1e-9, atol=1e-10)


def test_anderson_accelerates_a_slow_pcdeq_map(float64):
    # a dense pcDEQ-1 layer with small injections: local rate close to 1
    torch.manual_seed(1)
    w = torch.rand(30, 30)
    w = w / torch.linalg.eigvals(w).abs().max() * 1.0
    u = torch.rand(4, 30) * 0.01

    def f(z):
        return torch.tanh(z @ w.T + u)

    z0 = torch.zeros(4, 30)
    plain = FixedPointIteration()(f, z0, tol=1e-8, max_iter=3000)
    fast = AndersonAcceleration()(f, z0, tol=1e-8, max_iter=3000)
    assert plain.stats.all_converged and fast.stats.all_converged
    assert fast.stats.iterations * 3 < plain.stats.iterations
    torch.testing.assert_close(fast.value, plain.value, rtol=1e-6, atol=1e-7)


class RecordingAnderson(AndersonAcceleration):
    """Records the smallest entry of every raw (unguarded) extrapolation."""

    def __init__(self, **options):
        super().__init__(**options)
        self.candidate_minima: list[float] = []

    def _extrapolate(self, state):
        point, valid = super()._extrapolate(state)
        self.candidate_minima.append(float(point[valid].min()) if bool(valid.any()) else 0.0)
        return point, valid


@pytest.mark.parametrize("memory", [3, 5])
def test_anderson_safeguard_keeps_iterates_nonnegative(float64, memory):
    f, z0 = batched_small_maps(batch=64, seed=0)
    fn = CountingMap(f)
    solver = RecordingAnderson(memory=memory)
    result = solver(fn, z0, tol=1e-10, max_iter=400)
    # the raw extrapolation did leave the orthant, so the safeguard was exercised ...
    assert min(solver.candidate_minima) < 0
    # ... yet every point the map was evaluated at, and the answer, stayed nonnegative
    assert min(fn.input_minima) >= 0
    assert bool((result.value >= 0).all())
    assert result.stats.all_converged
    plain = FixedPointIteration()(f, z0, tol=1e-12, max_iter=3000)
    torch.testing.assert_close(result.value, plain.value, rtol=1e-7, atol=1e-8)


def test_anderson_handles_the_signed_adjoint_problem(float64):
    # the orthant test must not apply where the plain step itself is signed
    problem = ZOO["adjoint_like"]()
    assert bool((problem.exact < 0).any()) and bool((problem.exact > 0).any())
    result = AndersonAcceleration()(problem.map(), problem.zeros(), tol=1e-12, max_iter=200)
    assert result.stats.all_converged
    torch.testing.assert_close(result.value, problem.exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_anderson_with_max_iter_below_memory(float64, max_iter):
    problem = ZOO["dense_tanh"]()
    fn = CountingMap(problem.map())
    result = AndersonAcceleration(memory=10)(fn, problem.zeros(), tol=1e-12, max_iter=max_iter)
    assert result.stats.iterations == max_iter == fn.calls
    assert result.stats.num_failed == problem.state_shape[0]
    assert bool(torch.isfinite(result.value).all())
    assert bool((result.value >= 0).all())


# -- non-finite values -----------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_nan_in_one_sample_is_reported_and_never_counts_as_converged(float64, solver_name):
    problem = ZOO["dense_tanh"]()
    z0 = problem.zeros()
    z0[1, 0] = math.nan
    result = get_solver(solver_name)(problem.map(), z0, tol=1e-10, max_iter=300)
    stats = result.stats
    assert stats.converged.tolist() == [True, False, True]
    assert math.isnan(float(stats.residual[1]))
    assert stats.max_residual == math.inf
    assert stats.iterations < 300  # the NaN sample stopped; the others converged
    ref = problem.reference()
    torch.testing.assert_close(result.value[[0, 2]], ref[[0, 2]], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("solver_name", BUILTIN)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_map_output_stops_at_the_first_check(float64, solver_name, bad):
    fn = CountingMap(lambda z: z + bad)
    result = get_solver(solver_name)(fn, torch.zeros(2, 3), tol=1e-6, max_iter=100, check_every=4)
    assert result.stats.iterations == 4 == fn.calls
    assert result.stats.num_failed == 2
    assert not bool(torch.isfinite(result.stats.residual).any())


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 0.0}, "tol must be"),
        ({"tol": math.nan}, "tol must be"),
        ({"tol": True}, "tol must be a positive finite number, got True"),
        ({"max_iter": 0}, "max_iter must be"),
        ({"max_iter": True}, "max_iter must be an integer >= 1, got True"),
        ({"max_iter": 2.5}, "max_iter must be"),
        ({"check_every": 0}, "check_every must be"),
    ],
)
@pytest.mark.parametrize("solver_name", BUILTIN)
def test_bad_call_arguments_are_named(solver_name, kwargs, match):
    args = {"tol": 1e-4, "max_iter": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        get_solver(solver_name)(torch.tanh, torch.zeros(2, 3), **args)


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_bad_states_and_maps_are_named(solver_name):
    solver = get_solver(solver_name)
    with pytest.raises(TypeError, match="floating-point"):
        solver(torch.tanh, torch.zeros(2, 3, dtype=torch.long), tol=1e-4, max_iter=5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        solver(torch.tanh, [0.0, 1.0], tol=1e-4, max_iter=5)
    with pytest.raises(ValueError, match="shaped like its input"):
        solver(lambda z: z[:, :2], torch.zeros(2, 3), tol=1e-4, max_iter=5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"memory": 0}, "memory must be"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": 1.5}, "beta must be"),
        ({"lam": -1.0}, "lam must be"),
        ({"window": 3}, "valid options: memory, beta, lam"),
    ],
)
def test_bad_anderson_options_are_named(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        get_solver("anderson", **options)


def test_fixed_point_takes_no_options():
    with pytest.raises(TypeError, match="unknown option.*'fixed_point'"):
        get_solver("fixed_point", memory=3)


def test_unknown_solver_lists_the_available_ones():
    with pytest.raises(UnknownNameError, match="unknown solver 'broyden'; available: .*anderson"):
        get_solver("broyden")


# -- every registered solver (plugins included) honours the contract -----------------------


def test_builtins_are_registered_as_keeping_the_orthant():
    for name in BUILTIN:
        assert name in list_solvers()
        assert SOLVERS.get(name).keeps_nonnegative


@pytest.mark.parametrize("solver_name", list_solvers())
def test_registered_solver_contract(float64, solver_name):
    problem = ZOO["conv_tanh"]()
    fn = CountingMap(problem.map())
    result = get_solver(solver_name)(fn, problem.zeros(), tol=1e-8, max_iter=300)
    assert isinstance(result, FixedPointResult)
    assert result.value.shape == problem.state_shape
    assert result.stats.all_converged
    assert result.stats.residual.shape == (problem.state_shape[0],)
    torch.testing.assert_close(result.value, problem.reference(), rtol=1e-6, atol=1e-7)
    if SOLVERS.get(solver_name).keeps_nonnegative:
        assert min(fn.input_minima) >= 0
    # it never raises on non-convergence: the statistics say so
    capped = get_solver(solver_name)(problem.map(), problem.zeros(), tol=1e-14, max_iter=2)
    assert capped.stats.iterations <= 2 and not capped.stats.all_converged
