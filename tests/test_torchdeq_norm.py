"""The ``pc_nonneg`` norm in every respect a TorchDEQ training script relies on."""

from __future__ import annotations

import argparse
import copy
import io
import pickle
import warnings
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reducers ForkingPickler uses)
import torchdeq
from torch import nn
from torchdeq import apply_norm, get_deq, remove_norm, reset_norm
from torchdeq.norm.weight_norm import WeightNorm
from torchdeq_support import PcCell, registered, torchdeq_registries  # noqa: F401

from pcdeq_plugin.torchdeq_bridge import (
    PcNonnegNorm,
    PcNonnegNotAppliedError,
    PcNonnegNotAppliedWarning,
    pcdeq_deq_kwargs,
    register_pc_nonneg_module,
)

PARAMETRIZATIONS = ["projection", "softplus"]


# -- the nonnegativity norm -----------------------------------------------------------------


@pytest.mark.parametrize("parametrization", ["projection", "softplus"])
@pytest.mark.usefixtures("registered")
def test_norm_apply_reset_remove_and_nonneg_after_steps(parametrization) -> None:
    torch.manual_seed(4)
    cell = PcCell(5, 8)
    nn.init.normal_(cell.W.weight)  # signed start: the norm must make it nonnegative
    apply_norm(cell, "pc_nonneg", filter_out=["inj"], pc_norm_param=parametrization)
    assert hasattr(cell.W, "weight_v") and "weight" not in cell.W._parameters
    assert "weight" in cell.inj._parameters  # filtered out: untouched
    assert float(cell.W.weight.detach().min()) >= 0
    deq = get_deq(pcdeq_deq_kwargs(f_solver="pcdeq", f_stop_mode="rel", ift=True))
    opt = torch.optim.SGD(cell.parameters(), lr=5.0)  # large steps push v below zero
    x = torch.randn(4, 5)
    for _ in range(3):
        reset_norm(cell)
        assert float(cell.W.weight.detach().min()) >= 0
        (z,), _ = deq(lambda z: cell(z, cell.injection(x)), torch.zeros(4, 8))
        opt.zero_grad()
        (-z.sum()).backward()
        opt.step()
    reset_norm(cell)
    weight = cell.W.weight.detach()
    assert float(weight.min()) >= 0 and torch.isfinite(weight).all()
    if parametrization == "projection":
        assert float(cell.W.weight_v.detach().min()) >= 0
        assert float(cell.W.weight_g.detach().min()) >= 0
    remove_norm(cell)
    assert isinstance(cell.W._parameters["weight"], nn.Parameter)
    assert float(cell.W.weight.detach().min()) >= 0
    assert not hasattr(cell.W, "weight_v") and not hasattr(cell.W, "_deq_norm")


@pytest.mark.usefixtures("registered")
def test_projection_guard_has_no_nan_for_a_zero_row() -> None:
    layer = nn.Linear(4, 3, bias=False)
    apply_norm(layer, "pc_nonneg")
    with torch.no_grad():
        layer.weight_v[1] = -1.0  # a whole row projected to zero
    reset_norm(layer)
    assert torch.isfinite(layer.weight).all()
    assert torch.equal(layer.weight[1], torch.zeros(4))


@pytest.mark.usefixtures("registered")
def test_norm_targets_and_no_pollution() -> None:
    assert WeightNorm._target_modules is not PcNonnegNorm._target_modules
    before = dict(WeightNorm._target_modules)

    class MyLinear(nn.Linear):
        pass

    torchdeq.register_norm_module(MyLinear, "pc_nonneg", names="weight", dims=0)
    assert MyLinear in PcNonnegNorm._target_modules
    assert WeightNorm._target_modules == before
    model = nn.Sequential(MyLinear(3, 3), nn.Conv2d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3))
    apply_norm(model, "pc_nonneg")
    for module in model:
        assert hasattr(module, "_deq_norm") and float(module.weight.detach().min()) >= 0


def test_norm_errors() -> None:
    with pytest.raises(ValueError, match="unknown pc_nonneg parametrization 'exp'; available:"):
        PcNonnegNorm.apply(nn.Linear(2, 2), parametrization="exp")
    with pytest.raises(TypeError, match="does not know which parameters of GRU"):
        PcNonnegNorm.apply(nn.GRU(2, 2))
    layer = nn.Linear(2, 2)
    PcNonnegNorm.apply(layer)
    with pytest.raises(ValueError, match="Linear.weight is not a parameter .is a norm already"):
        PcNonnegNorm.apply(layer)


def _normed_linear(parametrization: str, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(4, 4, bias=False)
    apply_norm(layer, "pc_nonneg", pc_norm_param=parametrization)
    return layer


# -- several forwards, one backward (issue 10, item 3) --------------------------------------------


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.usefixtures("registered")
def test_several_forwards_then_one_backward(parametrization) -> None:
    """Each forward starts with reset_norm (which projects); one backward over all of them."""
    layer = _normed_linear(parametrization)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    reset_norm(layer)
    loss1 = layer(x1).pow(2).sum()
    reset_norm(layer)
    loss2 = layer(x2).pow(2).sum()
    (loss1 + loss2).backward()
    together = [p.grad.clone() for p in layer.parameters()]

    reference = _normed_linear(parametrization)
    for x in (x1, x2):
        reset_norm(reference)
        reference(x).pow(2).sum().backward()
    for got, want in zip(together, (p.grad for p in reference.parameters())):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.usefixtures("registered")
def test_weight_is_nonnegative_even_before_the_projection() -> None:
    """An optimizer step can push raw parameters below zero; W never goes negative."""
    layer = _normed_linear("projection")
    with torch.no_grad():
        layer.weight_v.fill_(-1.0)
        layer.weight_v[0, 0] = 2.0
    weight = layer._deq_norm.compute_weight(layer, "weight", 0)  # no projection first
    assert float(weight.detach().min()) >= 0
    weight.sum().backward()
    # projected-gradient semantics: an entry clamped to zero still gets its gradient
    assert float(layer.weight_v.grad[1].abs().sum()) > 0


# -- deepcopy, pickling, state_dict (issue 10, item 4) --------------------------------------------


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.usefixtures("registered")
def test_deepcopy_after_apply_and_reset(parametrization) -> None:
    cell = PcCell(3, 5)
    apply_norm(cell, "pc_nonneg", filter_out=["inj"], pc_norm_param=parametrization)
    reset_norm(cell)
    ema = copy.deepcopy(cell)
    assert torch.equal(ema.W.weight.detach(), cell.W.weight.detach())
    # the copy's weight is built from the copy's own parameters
    z, u = torch.rand(2, 5), torch.rand(2, 5)
    ema(z, u).sum().backward()
    assert ema.W.weight_v.grad is not None and cell.W.weight_v.grad is None
    # an EMA update of the copy's parameters shows after its reset_norm
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    reset_norm(ema)
    assert not torch.allclose(ema.W.weight.detach(), cell.W.weight.detach())
    remove_norm(ema)
    assert isinstance(ema.W._parameters["weight"], nn.Parameter)
    assert hasattr(cell.W, "_deq_norm")  # the original keeps its norm


@pytest.mark.usefixtures("registered")
def test_deepcopy_under_no_grad_and_of_the_weight_alone() -> None:
    layer = _normed_linear("projection")
    with torch.no_grad():
        copied = copy.deepcopy(layer)
    assert copied.weight.grad_fn is not None  # rebuilt with history, as the original
    alone = copy.deepcopy(layer.weight)
    assert type(alone) is torch.Tensor and alone.grad_fn is None
    assert torch.equal(alone, layer.weight.detach())


def _forking_round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buffer.getvalue())


@pytest.mark.parametrize("how", ["pickle", "forking_pickler", "torch_save"])
@pytest.mark.usefixtures("registered")
def test_normed_model_pickles(tmp_path, how) -> None:
    """Spawned DataLoader workers and mp.spawn pickle with torch.multiprocessing's reducers."""
    cell = PcCell(3, 5)
    apply_norm(cell, "pc_nonneg", filter_out=["inj"])
    reset_norm(cell)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(cell))
    elif how == "forking_pickler":
        loaded = _forking_round_trip(cell)
    else:
        torch.save(cell, tmp_path / "cell.pt")
        loaded = torch.load(tmp_path / "cell.pt", weights_only=False)
    assert torch.equal(loaded.W.weight.detach(), cell.W.weight.detach())
    reset_norm(loaded)  # the norm came along and recomputes the weight with history
    assert loaded.W.weight.grad_fn is not None
    z, u = torch.rand(2, 5), torch.rand(2, 5)
    assert torch.allclose(loaded(z, u), cell(z, u))


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.usefixtures("registered")
def test_state_dict_round_trip_recomputes_the_weight(assign) -> None:
    source = _normed_linear("projection", seed=1)
    with torch.no_grad():
        source.weight_v.mul_(3.0)
    reset_norm(source)
    state = source.state_dict()
    assert set(state) == {"weight_v", "weight_g"}
    target = _normed_linear("projection", seed=2)
    target.load_state_dict(copy.deepcopy(state), assign=assign)
    # no reset_norm needed: loading recomputed W from the loaded parameters
    assert torch.allclose(target.weight.detach(), source.weight.detach())
    target.weight.sum().backward()
    assert target.weight_v.grad is not None


@pytest.mark.usefixtures("registered")
def test_remove_norm_drops_the_load_hook() -> None:
    layer = _normed_linear("projection")
    assert len(layer._load_state_dict_post_hooks) == 1
    remove_norm(layer)
    assert len(layer._load_state_dict_post_hooks) == 0
    layer.load_state_dict(layer.state_dict())  # plain again
    assert set(layer.state_dict()) == {"weight"}


# -- layer types TorchDEQ's registry does not know (issue 10, item 5) ---------------------------------


class RawCell(nn.Module):
    """A DEQ cell holding its recurrent weight as a bare parameter, as research code does."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(width, width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.bias + u)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = RawCell(4)


@pytest.mark.usefixtures("registered")
def test_unknown_layer_type_warns_naming_it() -> None:
    model = Net()
    with pytest.warns(PcNonnegNotAppliedWarning) as record:
        apply_norm(model, "pc_nonneg")
    message = str(record[0].message)
    assert "found nothing to constrain in Net" in message
    assert "cell (RawCell: W, bias)" in message
    assert "register_pc_nonneg_module" in message
    assert record[0].filename == __file__  # points at the caller of apply_norm


@pytest.mark.usefixtures("registered")
def test_missing_policy_error_by_option() -> None:
    with pytest.raises(PcNonnegNotAppliedError, match="found nothing to constrain"):
        apply_norm(Net(), "pc_nonneg", pc_norm_missing="error")
    args = argparse.Namespace(norm_type="pc_nonneg", pc_norm_missing="error")
    with pytest.raises(PcNonnegNotAppliedError):
        apply_norm(Net(), args=args)
    with pytest.raises(
        ValueError, match="unknown pc_norm_missing 'ignore'; available: warn, error"
    ):
        apply_norm(Net(), "pc_nonneg", pc_norm_missing="ignore")


@pytest.mark.usefixtures("registered")
def test_filtering_everything_out_warns() -> None:
    with pytest.warns(PcNonnegNotAppliedWarning, match="skipped by filter_out.*: inj, W"):
        apply_norm(PcCell(3, 4), "pc_nonneg", filter_out=["W", "inj"])


@pytest.mark.usefixtures("registered")
def test_registered_custom_layer_is_constrained_without_warning() -> None:
    register_pc_nonneg_module(RawCell, names="W", dims=0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_norm(model, "pc_nonneg")
    assert "W" not in model.cell._parameters and "W_v" in model.cell._parameters
    assert "bias" in model.cell._parameters  # only the registered name
    reset_norm(model)
    assert float(model.cell.W.detach().min()) >= 0
    out = model.cell(torch.rand(2, 4), torch.rand(2, 4))
    out.sum().backward()
    assert model.cell.W_v.grad is not None


@pytest.mark.usefixtures("registered")
def test_subclasses_of_known_layers_are_constrained() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 3))
    apply_norm(model, "pc_nonneg")
    assert hasattr(model[0], "_deq_norm")


@pytest.mark.usefixtures("registered")
def test_other_norms_are_not_checked() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_norm(Net(), "weight_norm")  # TorchDEQ's own norm: TorchDEQ's behaviour
    assert "W" in Net().cell._parameters


@pytest.mark.parametrize(
    ("args", "error", "needle"),
    [
        ((int,), TypeError, "must be an nn.Module subclass"),
        ((RawCell, ""), ValueError, "names must be a parameter name"),
        ((RawCell, ["W"], "0"), ValueError, "dims must be an int or a list of ints"),
        ((RawCell, ["W", "bias"], [0]), ValueError, "differ in length"),
    ],
)
def test_register_pc_nonneg_module_checks_its_arguments(args, error, needle) -> None:
    with pytest.raises(error, match=needle):
        register_pc_nonneg_module(*args)


@pytest.mark.usefixtures("registered")
def test_training_a_registered_custom_cell_keeps_weights_nonnegative() -> None:
    register_pc_nonneg_module(RawCell, names="W", dims=0)
    torch.manual_seed(3)
    cell = RawCell(6)
    apply_norm(cell, "pc_nonneg")
    deq = get_deq(pcdeq_deq_kwargs(f_solver="pcdeq", b_solver="pcdeq", ift=True))
    opt = torch.optim.SGD(cell.parameters(), lr=2.0)
    u = torch.rand(4, 6)
    for _ in range(3):
        reset_norm(cell)
        (z,), _ = deq(lambda z: cell(z, u), torch.zeros(4, 6))
        opt.zero_grad()
        (-z.sum()).backward()
        opt.step()
    reset_norm(cell)
    assert float(cell.W.detach().min()) >= 0 and float(cell.W_v.detach().min()) >= 0
    assert torchdeq.norm.base_norm._norm_class["pc_nonneg"] is PcNonnegNorm
    assert WeightNorm._target_modules.get(RawCell) is None


@pytest.mark.usefixtures("registered")
def test_a_bad_missing_policy_is_refused_even_when_layers_match() -> None:
    with pytest.raises(ValueError, match="unknown pc_norm_missing 'warm'; available: warn, error"):
        apply_norm(nn.Linear(2, 2), "pc_nonneg", pc_norm_missing="warm")


class Classifier(nn.Module):
    """A realistic TorchDEQ model: known injection and head, a DEQ cell of our own."""

    def __init__(self) -> None:
        super().__init__()
        self.inj = nn.Linear(3, 4)
        self.cell = RawCell(4)
        self.norm = nn.LayerNorm(4)  # torch's own parameter holders are never reported
        self.head = nn.Linear(4, 2)


@pytest.mark.usefixtures("registered")
def test_a_custom_cell_left_signed_next_to_constrained_layers_warns() -> None:
    model = Classifier()
    with pytest.warns(PcNonnegNotAppliedWarning) as record:
        apply_norm(model, "pc_nonneg")
    message = str(record[0].message)
    assert "constrains 2 layer(s) of Classifier" in message
    assert "cell (RawCell: W, bias)" in message and "LayerNorm" not in message
    assert hasattr(model.head, "_deq_norm")  # what it knows it did constrain
    with pytest.raises(PcNonnegNotAppliedError, match="leaves the weights"):
        apply_norm(Classifier(), "pc_nonneg", pc_norm_missing="error")


@pytest.mark.usefixtures("registered")
def test_filtering_the_custom_cell_out_or_registering_it_silences_the_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_norm(Classifier(), "pc_nonneg", filter_out=["cell"])
        register_pc_nonneg_module(RawCell, names="W", dims=0)
        model = Classifier()
        apply_norm(model, "pc_nonneg", filter_out=["inj", "head"])
    assert "W_v" in model.cell._parameters
