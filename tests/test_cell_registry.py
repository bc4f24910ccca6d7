"""Cells as a registry (issue 12): every registered cell on every backbone, by name."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn

import pcdeq_plugin
from pcdeq_plugin import ImplicitBlock, build_model, hookimpl
from pcdeq_plugin.catalog import get_cell, list_cells
from pcdeq_plugin.cell_models import BACKBONES
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear
from pcdeq_plugin.specs import CellSpec, UnknownNameError

SIZES = {"linear": {"width": 6}, "single-conv": {"width": 4}, "multi-conv": {"widths": (3, 4, 5)}}
SHAPE = (1, 9, 9)


def _plugin_cell(state_shape: tuple[int, ...], name: str, **options) -> ImplicitBlock:
    # a pcDEQ-1 cell with a 5x5 kernel: what a plugin could add without writing a network
    if len(state_shape) == 1:
        return PcDEQLinear(state_shape[0], name=name, **options)
    return PcDEQConv(state_shape[0], kernel_size=5, name=name, **options)


PLUGIN = types.ModuleType("pcdeq_test_cell_plugin")
PLUGIN.pcdeq_register_cells = hookimpl(  # type: ignore[attr-defined]
    lambda: {
        "test-5x5": CellSpec(
            "test-5x5", _plugin_cell, family="test", description="5x5 pcDEQ", options=("beta",)
        )
    }
)


@pytest.fixture(scope="module", autouse=True)
def plugin_cell():
    pcdeq_plugin.plugins.add_plugin(PLUGIN)
    yield
    pcdeq_plugin.catalog.CELLS.unregister("test-5x5")


def test_built_in_and_baseline_cells_are_registered():
    assert {"pcdeq-1", "pcdeq-2", "deq", "mondeq", "test-5x5"} <= set(list_cells())
    assert pcdeq_plugin.catalog.CELLS.provider("deq") == "pcdeq_baselines"
    assert get_cell("mondeq").state_kinds == ("dense",)
    with pytest.raises(UnknownNameError, match="unknown cell 'nope'; available: .*pcdeq-1"):
        build_model("single-conv", SHAPE, 10, cell="nope")


def _cases():
    for cell in sorted(set(list_cells()) | {"test-5x5"}):
        for arch in BACKBONES:
            yield cell, arch


@pytest.mark.parametrize(("cell", "arch"), list(_cases()))
def test_every_cell_on_every_backbone(cell, arch):
    kind = BACKBONES[arch][1]
    if kind not in get_cell(cell).state_kinds:
        with pytest.raises(ValueError, match=f"cell {cell!r} does not fit the {arch} backbone"):
            build_model(arch, SHAPE, 10, cell=cell, **SIZES[arch])
        return
    torch.manual_seed(0)
    model = build_model(arch, SHAPE, 10, cell=cell, **SIZES[arch])
    assert isinstance(model, BACKBONES[arch][0]) and model.family == get_cell(cell).family
    x = torch.rand(3, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained unconstrained cell may miss its tol
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    stats = model.solver_stats()
    assert len(stats) == (3 if arch == "multi-conv" else 1)
    assert all(s.forward.iterations >= 1 and s.backward is not None for s in stats)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("variant", [1, 2])
def test_paper_names_are_aliases_of_backbone_and_cell(arch, variant):
    torch.manual_seed(0)
    by_cell = build_model(arch, SHAPE, 10, cell=f"pcdeq-{variant}", **SIZES[arch])
    torch.manual_seed(0)
    by_name = build_model(f"pcdeq-{arch}-{variant}", SHAPE, 10, **SIZES[arch])
    a, b = by_cell.state_dict(), by_name.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, *SHAPE)
    by_cell.eval(), by_name.eval()
    assert torch.equal(by_cell(x), by_name(x))


def test_deq_name_is_the_backbone_with_the_deq_cell():
    torch.manual_seed(0)
    by_cell = build_model("multi-conv", SHAPE, 10, cell="deq", widths=(3, 4, 5), tol=1e-3)
    torch.manual_seed(0)
    by_name = build_model("deq-multi-conv", SHAPE, 10, widths=(3, 4, 5), tol=1e-3)
    a, b = by_cell.state_dict(), by_name.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_options_reach_the_cell_and_bad_ones_are_named():
    model = build_model("single-conv", SHAPE, 10, cell="pcdeq-2", width=4, max_iter=7)
    assert model.block.config.max_iter == 7 and model.block.variant == 2
    with pytest.raises(TypeError, match=r"unknown option\(s\) m; valid options: .*width"):
        build_model("single-conv", SHAPE, 10, cell="deq", m=2.0)
    with pytest.raises(TypeError, match="memory_format"):
        build_model("linear", SHAPE, 10, cell="pcdeq-1", memory_format="contiguous")


def test_a_bad_cell_spec_is_refused():
    with pytest.raises(ValueError, match="state_kinds"):
        CellSpec("x", _plugin_cell, family="x", state_kinds=("sphere",))
