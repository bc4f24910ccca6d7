"""The common interface (pcdeq_plugin.interface): SolverConfig validation and its helpers,
the statistics records."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pcdeq_plugin import BlockStats, SolverConfig, SolveStats
from pcdeq_plugin.interface import split_solver_options


def test_field_names_are_the_dataclass_fields_in_order() -> None:
    names = SolverConfig.field_names()
    assert names == tuple(f.name for f in dataclasses.fields(SolverConfig))
    assert names[:3] == ("solver", "tol", "max_iter") and "solver_options" in names
    assert SolverConfig().field_names() == names  # also on an instance


def test_split_solver_options_separates_config_fields_from_the_rest() -> None:
    overrides = {"width": 8, "tol": 1e-3, "solver": "anderson", "activation": "tanh"}
    solver_part, rest = split_solver_options(overrides)
    assert solver_part == {"tol": 1e-3, "solver": "anderson"}
    assert rest == {"width": 8, "activation": "tanh"}
    assert overrides == {"width": 8, "tol": 1e-3, "solver": "anderson", "activation": "tanh"}
    config = SolverConfig(**solver_part)
    assert (config.solver, config.tol) == ("anderson", 1e-3)
    assert split_solver_options({}) == ({}, {})


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"tol": 0}, ValueError, "tol must be a positive finite number, got 0"),
        ({"tol": math.nan}, ValueError, "tol must be a positive finite number"),
        ({"tol": True}, ValueError, "tol must be a positive finite number, got True"),
        ({"tol": "1e-4"}, ValueError, "tol must be a positive finite number, got '1e-4'"),
        ({"max_iter": 0}, ValueError, "max_iter must be an integer >= 1, got 0"),
        ({"max_iter": 10.0}, ValueError, "max_iter must be an integer >= 1, got 10.0"),
        ({"max_iter": True}, ValueError, "max_iter must be an integer >= 1, got True"),
        ({"backward_tol": "x"}, ValueError, "backward_tol must be a positive finite number"),
        ({"backward_tol": math.inf}, ValueError, "backward_tol must be a positive finite"),
        ({"backward_tol": -1e-3}, ValueError, "backward_tol must be a positive finite"),
        ({"backward_max_iter": 0}, ValueError, "backward_max_iter must be an integer >= 1"),
        ({"check_every": False}, ValueError, "check_every must be an integer >= 1, got False"),
        ({"on_failure": "explode"}, ValueError, "available: ignore, warn, raise"),
        ({"solver": 3}, TypeError, r"solver must be the name of a registered solver.*got 3"),
        ({"solver": ""}, TypeError, "solver must be the name of a registered solver"),
        ({"backward_solver": 1}, TypeError, "backward_solver must be the name"),
        ({"solver_options": None}, TypeError, r"solver_options must be a dict.*got None"),
        ({"solver_options": [("memory", 3)]}, TypeError, "solver_options must be a dict"),
        ({"solver_options": {1: 2}}, TypeError, "solver_options must be a dict"),
    ],
)
def test_bad_values_name_the_field_and_what_is_valid(changes, error, message) -> None:
    with pytest.raises(error, match=message):
        SolverConfig(**changes)
    with pytest.raises(error, match=message):  # replace() validates again
        SolverConfig().replace(**changes)


def test_valid_values_and_effective_backward_settings() -> None:
    config = SolverConfig(solver="anderson", tol=1, max_iter=5, solver_options={"memory": 2})
    assert config.effective_backward_solver == "anderson"
    assert (config.effective_backward_tol, config.effective_backward_max_iter) == (1, 5)
    other = config.replace(backward_solver="fixed_point", backward_tol=1e-6, backward_max_iter=9)
    assert other.effective_backward_solver == "fixed_point"
    assert (other.effective_backward_tol, other.effective_backward_max_iter) == (1e-6, 9)
    with pytest.raises(TypeError, match=r"unknown SolverConfig field\(s\) \['tool'\]; valid"):
        config.replace(tool=1)


def test_solve_stats_summary_and_block_stats() -> None:
    stats = SolveStats(
        iterations=7,
        residual=torch.tensor([1e-5, math.nan]),
        converged=torch.tensor([True, False]),
        seconds=0.5,
        solver="fixed_point",
        max_iter=7,
    )
    assert stats.batch_size == 2 and stats.num_failed == 1 and not stats.all_converged
    assert stats.max_residual == math.inf  # a NaN residual is reported as infinitely bad
    summary = BlockStats("blk", forward=stats).summary()
    assert summary["backward"] is None
    assert summary["forward"] == {
        "iterations": 7,
        "unit": "iter",
        "solver": "fixed_point",
        "max_iter": 7,
        "warm_iterations": 0,
        "refine_iterations": 0,
        "max_residual": math.inf,
        "failed": 1,
        "batch": 2,
        "seconds": 0.5,
    }


def test_check_every_default_depends_on_the_device():
    from pcdeq_plugin.interface import ACCELERATOR_CHECK_EVERY

    config = SolverConfig()
    assert config.check_every is None
    assert config.effective_check_every("cpu") == 1  # a check costs no sync on the CPU
    assert config.effective_check_every(torch.device("cuda", 0)) == ACCELERATOR_CHECK_EVERY
    assert config.effective_check_every("mps") == ACCELERATOR_CHECK_EVERY
    assert SolverConfig(check_every=3).effective_check_every("cuda") == 3
