"""The paper's six pcDEQ networks: registration, official parameter counts, presets,
overrides, a training step on tiny sizes, and bad input."""

from __future__ import annotations

import pytest
import torch

import pcdeq_plugin as P
from pcdeq_plugin.models import MODEL_SPECS

NAMES = [f"pcdeq-{arch}-{v}" for arch in ("linear", "single-conv", "multi-conv") for v in (1, 2)]
MNIST, RGB = (1, 28, 28), (3, 32, 32)

# official parameter counts (pcdeq.md section 2.2): (arch, input shape, preset) -> params
COUNTS = [
    ("linear", MNIST, "mnist", 70_410),
    ("single-conv", MNIST, "mnist", 69_136),
    ("multi-conv", MNIST, "mnist", 41_278),
    ("single-conv", RGB, "svhn", 164_760),
    ("multi-conv", RGB, "svhn", 130_950),
    ("single-conv", RGB, "cifar10", 164_760),
    ("multi-conv", RGB, "cifar10", 130_950),
    ("multi-conv", RGB, "cifar10-aug", 661_470),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_registered_through_the_hook() -> None:
    assert set(NAMES) == set(MODEL_SPECS)
    assert set(NAMES) <= set(P.list_models())
    for name in NAMES:
        spec = P.registry.MODELS.get(name)
        assert spec.family == "pcdeq" and "small" in spec.presets
        assert spec.training["optimizer"] == "adamw" and spec.training["lr"] == 5e-4
        assert spec.training["batch_size"] == 64 and len(spec.training["milestones"]) == 1
        assert P.registry.MODELS.provider(name) == "pcdeq_plugin.models"


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize(("arch", "shape", "preset", "count"), COUNTS)
def test_official_parameter_counts(
    arch: str, shape: tuple, preset: str, count: int, variant: int
) -> None:
    model = P.build_model(f"pcdeq-{arch}-{variant}", shape, 10, preset=preset)
    assert n_params(model) == count
    assert model.family == "pcdeq"


@pytest.mark.parametrize(("arch", "shape", "preset", "count"), COUNTS[:5])
def test_widths_default_from_input_shape(arch: str, shape: tuple, preset: str, count: int) -> None:
    assert n_params(P.build_model(f"pcdeq-{arch}-1", shape, 10)) == count


def test_inner_deq_parameter_counts() -> None:
    model = P.build_model("pcdeq-multi-conv-1", MNIST, 10)
    inner = sum(n_params(b) for b in model.implicit_blocks())
    assert inner == 27_300 and len(model.implicit_blocks()) == 3
    assert (
        sum(n_params(b) for b in P.build_model("pcdeq-linear-2", MNIST, 10).implicit_blocks())
        == 6_480
    )


# tiny sizes for the forward/backward checks
TINY = {"linear": {"width": 5}, "single-conv": {"width": 3}, "multi-conv": {"widths": (2, 3, 4)}}


@pytest.mark.parametrize("name", NAMES)
def test_training_step_keeps_w_nonnegative_and_records_stats(name: str) -> None:
    arch = name.removeprefix("pcdeq-")[:-2]
    shape = (1, 9, 9)  # a non-dataset shape: every architecture adapts
    model = P.build_model(name, shape, 4, **TINY[arch], tol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    x, y = torch.rand(6, *shape), torch.randint(0, 4, (6,))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
    stats = model.solver_stats()
    assert len(stats) == (3 if "multi" in name else 1)
    for record in stats:
        assert record.forward.iterations >= 1 and record.backward.iterations >= 1
        assert record.forward.all_converged
    for block in model.implicit_blocks():
        assert (block.weight >= 0).all()
        assert block.variant == int(name[-1])
        assert block.activation.name == ("tanh" if name.endswith("1") else "sigmoid")
    assert model(x).shape == (6, 4)


@pytest.mark.parametrize("name", NAMES)
def test_small_preset_is_smaller_and_runs(name: str) -> None:
    small = P.build_model(name, MNIST, 10, preset="small")
    assert n_params(small) < n_params(P.build_model(name, MNIST, 10)) or "linear" in name
    with torch.no_grad():
        out = small.eval()(torch.rand(2, *MNIST))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_overrides_reach_the_blocks() -> None:
    model = P.build_model(
        "pcdeq-single-conv-1",
        MNIST,
        10,
        preset="small",
        activation="relu6",
        beta=2.0,
        constraint="guarded_weight_norm",
        solver="anderson",
        tol=1e-3,
        max_iter=30,
        on_failure="ignore",
        check_every=2,
        backward_solver="fixed_point",
    )
    (block,) = model.implicit_blocks()
    assert block.activation.name == "relu6" and block.beta == 2.0
    assert block.constraint_scheme == "guarded_weight_norm"
    cfg = block.config
    assert (cfg.solver, cfg.tol, cfg.max_iter, cfg.on_failure, cfg.check_every) == (
        "anderson",
        1e-3,
        30,
        "ignore",
        2,
    )
    assert cfg.effective_backward_solver == "fixed_point"
    with torch.no_grad():
        model(torch.rand(2, *MNIST))
    assert block.last_stats.forward.solver == "anderson"


def test_bad_overrides_and_inputs() -> None:
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) \['depth'\]; valid options: activation, .*widths"
    ):
        P.build_model("pcdeq-linear-1", MNIST, 10, depth=3)
    with pytest.raises(TypeError, match="unknown option"):
        P.build_model("pcdeq-multi-conv-1", MNIST, 10, width=3)
    with pytest.raises(ValueError, match="three integers"):
        P.build_model("pcdeq-multi-conv-1", MNIST, 10, widths=(3, 4))
    with pytest.raises(ValueError, match="three integers"):
        P.build_model("pcdeq-multi-conv-1", MNIST, 10, widths=(True, 4, 4))
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 8.0"):
        P.build_model("pcdeq-single-conv-1", MNIST, 10, width=8.0)
    with pytest.raises(ValueError, match="use variant 1"):
        P.build_model("pcdeq-linear-2", MNIST, 10, activation="tanh")
    with pytest.raises(P.UnknownNameError, match="unknown activation 'nope'; available:"):
        P.build_model("pcdeq-linear-1", MNIST, 10, activation="nope")
    with pytest.raises(P.UnknownNameError, match="no preset 'cifar10-aug'; available: .*small"):
        P.build_model("pcdeq-single-conv-1", RGB, 10, preset="cifar10-aug")
    with pytest.raises(ValueError, match="unknown constraint"):
        P.build_model("pcdeq-linear-1", MNIST, 10, constraint="relu")
    with pytest.raises(ValueError, match="at least 7x7"):
        P.build_model("pcdeq-multi-conv-1", (1, 6, 6), 10)
    model = P.build_model("pcdeq-linear-1", (1, 4, 4), 3, width=3)
    with pytest.raises(
        ValueError, match=r"expected a batch of images of shape \[batch, 1, 4, 4\], got \[2, 16\]"
    ):
        model(torch.rand(2, 16))
    with pytest.raises(ValueError, match="NaN/Inf"):
        model(torch.full((2, 1, 4, 4), float("nan")))


def test_solver_mistakes_fail_at_build_time_naming_the_field() -> None:
    """A solver typo must not wait for the first forward pass to surface."""
    with pytest.raises(
        P.UnknownNameError, match=r"SolverConfig.solver: unknown solver 'newton'; available: "
    ):
        P.build_model("pcdeq-linear-1", MNIST, 10, solver="newton")
    with pytest.raises(P.UnknownNameError, match=r"SolverConfig.backward_solver: .*'broyden'"):
        P.build_model("pcdeq-linear-1", MNIST, 10, backward_solver="broyden")
    with pytest.raises(TypeError, match=r"solver_options.*\['m'\].*valid options: memory"):
        P.build_model("pcdeq-linear-1", MNIST, 10, solver="anderson", solver_options={"m": 3})
    with pytest.raises(TypeError, match=r"\['memory'\] for solver 'fixed_point'.*\(none\)"):
        P.build_model("pcdeq-linear-1", MNIST, 10, solver_options={"memory": 3})
    with pytest.raises(ValueError, match="tol must be a positive finite number, got True"):
        P.build_model("pcdeq-linear-1", MNIST, 10, tol=True)


def test_input_batches_of_the_wrong_kind() -> None:
    model = P.build_model("pcdeq-linear-1", (1, 4, 4), 3, width=3).eval()
    with pytest.raises(TypeError, match="floating-point batch of images, got dtype torch.int64"):
        model(torch.ones(2, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty batch of images, got batch size 0"):
        model(torch.rand(0, 1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \[batch, 1, 4, 4\], got ndarray"):
        model(torch.rand(2, 1, 4, 4).numpy())
    with pytest.raises(ValueError, match="NaN/Inf"):
        model(torch.full((2, 1, 4, 4), float("inf")))
