"""The solver loop's two bookkeeping paths give the same answers.

On the CPU the per-sample checks run in NumPy; on CUDA/MPS they stay on the device with
one synchronisation per check. CI has no GPU, so the device path is run here on the CPU by
emptying :data:`pcdeq_plugin.convergence_checks.HOST_CHECK_DEVICES`.
"""

from __future__ import annotations

import math

import pytest
import torch
from solver_zoo import ZOO, slow_tanh_batch

from pcdeq_plugin import convergence_checks, get_solver

BUILTIN = ("fixed_point", "anderson")


def _solve_both(monkeypatch, solver_name, fn, z0, **kwargs):
    solver = get_solver(solver_name)
    host = solver(fn, z0, **kwargs)
    monkeypatch.setattr(convergence_checks, "HOST_CHECK_DEVICES", ())
    device = solver(fn, z0, **kwargs)
    monkeypatch.undo()
    return host, device


def _assert_same(host, device):
    assert host.stats.iterations == device.stats.iterations
    assert host.stats.converged.tolist() == device.stats.converged.tolist()
    torch.testing.assert_close(host.value, device.value, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(
        host.stats.residual.to(device.stats.residual.dtype),
        device.stats.residual,
        rtol=1e-6,
        atol=0,
        equal_nan=True,
    )


@pytest.mark.parametrize("solver_name", BUILTIN)
@pytest.mark.parametrize("problem_name", sorted(ZOO))
@pytest.mark.parametrize("check_every", [None, 1, 3])
def test_device_path_equals_host_path(float64, monkeypatch, solver_name, problem_name, check_every):
    problem = ZOO[problem_name]()
    host, device = _solve_both(
        monkeypatch,
        solver_name,
        problem.map(),
        problem.zeros(),
        tol=1e-9,
        max_iter=300,
        check_every=check_every,
    )
    _assert_same(host, device)
    assert host.stats.all_converged


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_device_path_keeps_finished_samples_and_reports_the_slow_one(
    float64, monkeypatch, solver_name
):
    fn, z0 = slow_tanh_batch((0.5, 0.3, 1e-4))
    host, device = _solve_both(monkeypatch, solver_name, fn, z0, tol=1e-6, max_iter=40)
    _assert_same(host, device)
    assert not bool(device.stats.converged[2])


@pytest.mark.parametrize("solver_name", BUILTIN)
def test_device_path_stops_nan_samples(float64, monkeypatch, solver_name):
    problem = ZOO["dense_tanh"]()
    z0 = problem.zeros()
    z0[1, 0] = math.nan
    host, device = _solve_both(monkeypatch, solver_name, problem.map(), z0, tol=1e-10, max_iter=300)
    _assert_same(host, device)
    assert device.stats.converged.tolist() == [True, False, True]


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_predicted_schedule_at_tiny_caps(float64, max_iter):
    # a check at iteration 1 (the cap) meets the zero-start prior of the same iteration
    problem = ZOO["dense_tanh"]()
    result = get_solver("fixed_point")(
        problem.map(), problem.zeros(), tol=1e-12, max_iter=max_iter, check_every=None
    )
    assert result.stats.iterations == max_iter
    assert not result.stats.all_converged


def test_predicted_schedule_never_skips_more_than_half_the_iterations_done(float64):
    # a state that keeps growing from zero holds its relative residual near 1 for a while;
    # a rate measured then would predict a skip far past convergence
    problem = ZOO["dense_tanh"]()
    fn = problem.map()

    def slow_start(z: torch.Tensor) -> torch.Tensor:
        return fn(z)

    plain = get_solver("fixed_point")(slow_start, problem.zeros(), tol=1e-10, max_iter=500)
    predicted = get_solver("fixed_point")(
        slow_start, problem.zeros(), tol=1e-10, max_iter=500, check_every=None
    )
    n = plain.stats.iterations
    assert n <= predicted.stats.iterations <= n + max(2, n // 2)
