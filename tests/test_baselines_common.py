"""Every baseline model, used the way a user uses it: by name, saved, reloaded, moved,
evaluated, differentiated in eval mode, and fed bad options or bad inputs."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from pcdeq_baselines import deq, geq, lben, mondeq, node, subdeq
from pcdeq_baselines.deq import UnconstrainedDEQBlock
from pcdeq_baselines.node import ODEBlock
from pcdeq_baselines.options import (
    announce_failure,
    check_count,
    check_counts,
    check_flag,
    check_positive_number,
)
from torch import nn

import pcdeq_plugin
from pcdeq_plugin import ConvergenceError, ConvergenceWarning, build_model

BASELINES = sorted(
    {
        **node.MODEL_SPECS,
        **deq.MODEL_SPECS,
        **mondeq.MODEL_SPECS,
        **subdeq.MODEL_SPECS,
        **lben.MODEL_SPECS,
        **geq.MODEL_SPECS,
    }
)
SHAPE = (1, 28, 28)


def _small(name: str, **overrides) -> pcdeq_plugin.ImplicitModel:
    torch.manual_seed(0)
    return build_model(name, SHAPE, 10, preset="small", on_failure="ignore", **overrides)


def _batch(n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_every_baseline_is_discovered_through_the_entry_point():
    from pcdeq_plugin.plugins import reset_plugins

    reset_plugins()
    record = {r.name: r for r in pcdeq_plugin.plugin_report()}["pcdeq_baselines"]
    assert record.source == "entry point" and record.status == "loaded", record.errors
    assert set(BASELINES) <= set(record.provides["model"])
    assert all(pcdeq_plugin.registry.MODELS.provider(n) == "pcdeq_baselines" for n in BASELINES)


@pytest.mark.parametrize("name", BASELINES)
def test_state_dict_round_trip_through_torch_save(name):
    model = _small(name)
    model.train()
    model(_batch(4)).sum().backward()  # moves BatchNorm statistics and monDEQ's counters
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model(name, SHAPE, 10, preset="small", on_failure="ignore")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    x = _batch()
    with torch.no_grad():
        expected, got = model(x), fresh(x)
    assert torch.allclose(expected, got, atol=1e-6), float((expected - got).abs().max())
    assert not got.requires_grad
    for stats in fresh.solver_stats():
        assert stats.forward is not None and stats.forward.residual.shape == (2,)
        assert stats.backward is None  # no graph, no backward record


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_flow_in_eval_mode_and_in_float64(name):
    model = _small(name).to(torch.float64).to("cpu").eval()
    x = _batch(dtype=torch.float64).requires_grad_(True)
    logits = model(x)
    assert logits.dtype == torch.float64
    (grad,) = torch.autograd.grad(logits.square().sum(), x)
    # every family must pass the gradient back through its implicit block in eval mode too
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for stats in model.solver_stats():
        assert stats.forward is not None and stats.backward is not None, stats.block
        assert stats.backward.residual.shape == (2,)


def test_unconstrained_block_eval_gradient_equals_training_gradient(float64):
    torch.manual_seed(0)
    block = UnconstrainedDEQBlock(nn.Linear(4, 4), tol=1e-12, max_iter=100, recurrent_init="torch")
    with torch.no_grad():
        block.layer.weight.mul_(0.3)
    u = torch.randn(3, 4, requires_grad=True)
    grads = []
    for training in (True, False):
        block.train(training)
        (g,) = torch.autograd.grad(block(u).square().sum(), u)
        grads.append(g)
        assert block.deq.training == training  # the module's mode is left as it was
        assert block.last_stats.backward is not None
    assert torch.allclose(grads[0], grads[1], atol=1e-10)
    block.eval()
    with torch.no_grad():
        out = block(u)
    assert not out.requires_grad
    assert block.last_stats.forward.iterations >= 1


@pytest.mark.parametrize("name", BASELINES)
def test_unknown_option_names_the_model_and_lists_the_valid_ones(name):
    with pytest.raises(TypeError, match=rf"^{name}: unknown option\(s\) \['bogus'\]; valid"):
        build_model(name, SHAPE, 10, preset="small", bogus=1)


@pytest.mark.parametrize("name", BASELINES)
def test_wrong_input_shape_is_refused_with_the_expected_shape(name):
    model = _small(name)
    with pytest.raises(ValueError, match=r"expected inputs of shape \[B, 1, 28, 28\]"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \[2, 784\]"):
        model(torch.rand(2, 784))
    # the models' other entry points that take raw inputs check them the same way
    for method in ("tune_alpha", "certificate"):
        if hasattr(model, method):
            with pytest.raises(ValueError, match=r"expected inputs of shape \[B, 1, 28, 28\]"):
                getattr(model, method)(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("node", "adjoint"),
        ("anode", "time_dependent"),
        ("mondeq-fc", "tune_alpha"),
        ("subdeq-fc", "normalize"),
        ("subdeq-conv-normalized", "normalize"),
    ],
)
def test_flags_must_be_real_bools(name, option):
    # "--model-option adjoint=False" arrives as the string "False", which bool() reads as True
    with pytest.raises(ValueError, match=rf"{option} must be True or False, got 'False'"):
        build_model(name, SHAPE, 10, preset="small", **{option: "False"})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("node", {"max_num_steps": True}, "max_num_steps must be an integer >= 1"),
        ("node", {"rtol": True}, "rtol must be a positive finite number"),
        ("deq-linear", {"tol": "small"}, "tol must be a positive finite number, got 'small'"),
        ("deq-linear", {"width": 0}, r"width must be 1 integer\(s\) >= 1"),
        ("deq-multi-conv", {"widths": (8, True, 8)}, r"widths must be 3 integer\(s\)"),
        ("mondeq-fc", {"width": 0}, "width must be an integer >= 1"),
        ("mondeq-single-conv", {"channels": 0}, "channels must be an integer >= 1"),
        ("mondeq-multi-tier", {"channels": (4, 0, 8)}, r"channels must be one or more integer"),
        ("mondeq-fc", {"backward_tol": float("nan")}, "backward_tol must be a positive finite"),
        ("subdeq-fc", {"width": 0}, "width must be an integer >= 1"),
        ("subdeq-conv", {"channels": 0}, "channels must be an integer >= 1"),
        ("subdeq-conv", {"pool": 2.0}, "pool must be an integer between 1 and"),
    ],
)
def test_bad_sizes_and_numbers_fail_at_build_time(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, SHAPE, 10, preset="small", **options)


def test_solver_names_and_options_are_checked_at_build_time():
    with pytest.raises(Exception, match="unknown solver 'newton'; available: anderson"):
        build_model("subdeq-fc", SHAPE, 10, preset="small", solver="newton")
    with pytest.raises(TypeError, match=r"\['memroy'\].*memory"):
        build_model("subdeq-fc", SHAPE, 10, preset="small", solver_options={"memroy": 3})
    with pytest.raises(ValueError, match=r"solver_options \['mm'\] are not read .*'anderson'.* m,"):
        build_model("deq-linear", SHAPE, 10, preset="small", solver_options={"mm": 3})
    block = UnconstrainedDEQBlock(nn.Linear(3, 3), solver_options={"m": 3, "lam": 1e-3})
    assert block.solver_options == {"m": 3, "lam": 1e-3}


def test_ode_options_torchdiffeq_would_ignore_are_refused():
    func = node.ConvODEFunc(1, 2)
    with pytest.raises(ValueError, match=r"ode_options \['step-size'\].*'rk4'.*step_size"):
        ODEBlock(func, method="rk4", ode_options={"step-size": 0.5})
    with pytest.raises(ValueError, match=r"\['step_size'\].*'dopri5'.*first_step"):
        ODEBlock(func, method="dopri5", ode_options={"step_size": 0.5})
    block = ODEBlock(func, method="rk4", ode_options={"step_size": 0.5}, adjoint=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchdiffeq warns about options it does not read
        block(torch.rand(2, 1, 3, 3))
    assert block.last_stats.forward.iterations == 8  # two rk4 steps of four evaluations


def test_option_helpers():
    assert check_count("n", 3) == 3 and check_count("n", 0, 0) == 0
    for bad in (True, 0, 2.0, "3"):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            check_count("n", bad)
    assert check_positive_number("tol", 1) == 1.0
    for bad in (True, 0, -1.0, float("inf"), float("nan"), "1e-3", None):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            check_positive_number("tol", bad)
    assert check_counts("w", [1, 2]) == (1, 2) and check_counts("w", 5, 1) == (5,)
    for bad in ((), (1, 0), (1, False), "12"):
        with pytest.raises(ValueError, match="w must be"):
            check_counts("w", bad)
    assert check_flag("f", False) is False
    with pytest.raises(ValueError, match="f must be True or False, got 1"):
        check_flag("f", 1)


def test_announce_failure_policies():
    announce_failure("quiet", "ignore")
    with pytest.warns(ConvergenceWarning, match="loud"):
        announce_failure("loud", "warn")
    cause = AssertionError("step limit")
    with pytest.raises(ConvergenceError, match="fatal") as info:
        announce_failure("fatal", "raise", cause=cause)
    assert info.value.__cause__ is cause
    with pytest.raises(ValueError, match="unknown on_failure 'explode'; available: ignore"):
        announce_failure("x", "explode")


@pytest.mark.parametrize("name", BASELINES)
def test_bf16_autocast_trains_with_finite_gradients(name):
    # pcdeq-bench --amp bf16: the blocks that solve an equilibrium do it in float32, and
    # their backward pass (which runs outside the caller's autocast) must not mix dtypes
    model = _small(name)
    target = torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_batch())
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for stats in model.solver_stats():
        assert stats.forward is not None and stats.backward is not None, stats.block


@pytest.mark.parametrize("name", BASELINES)
def test_whole_model_pickles_and_deep_copies(name):
    # torch.save(model) and copy.deepcopy (e.g. keeping a best model); TorchDEQ's instance
    # holds closures, so the unconstrained blocks rebuild it from their settings
    model = _small(name).eval()
    x = _batch()
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert not clone.training
        with torch.no_grad():
            assert torch.allclose(clone(x), expected, atol=1e-6)
        clone.train()
        clone(_batch(4)).sum().backward()
        assert all(s.backward is not None for s in clone.solver_stats())
