"""Any registered cell on any backbone, by name: the built-in cells and the backbone models.

The built-in cells ``pcdeq-1`` and ``pcdeq-2`` (pcDEQ blocks, dense or 3x3 conv) are
registered here through ``pcdeq_register_cells``, like any plugin's cells; the baselines add
``deq`` (the unconstrained TorchDEQ cell) and ``mondeq`` (dense states only).

The models ``linear``, ``single-conv`` and ``multi-conv`` are the shared backbones of
:mod:`.backbones` with the cell named by the ``cell`` option::

    build_model("single-conv", (3, 32, 32), 10, cell="pcdeq-2", preset="svhn")

Options other than the backbone's (``width``/``widths``, ``memory_format``) go to the cell,
which lists the ones it accepts. The paper names stay as aliases: ``pcdeq-single-conv-2``
is this backbone with ``pcdeq-2`` (the same classes, parameter counts and state dicts), and
``deq-single-conv`` the same backbone with ``deq``. A plugin that registers a cell so gets
the backbones, the harness (``pcdeq-bench train --model single-conv --cell NAME``) and the
comparison without writing a network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .backbones import LinearBackbone, MultiConvBackbone, SingleConvBackbone
from .catalog import get_cell
from .hookspecs import hookimpl
from .interface import ImplicitModel, SolverConfig, split_solver_options
from .models import _BLOCK_KEYS, _WIDTHS, TRAINING, _check_widths, _default_width, pcdeq_cell
from .specs import CellSpec, ModelSpec

__all__ = ["BACKBONES", "CELL_SPECS", "MODEL_SPECS", "STATE_KINDS", "build_on_backbone"]

#: backbone name -> (class, the kind of state its cells get)
BACKBONES: dict[str, tuple[type[ImplicitModel], str]] = {
    "linear": (LinearBackbone, "dense"),
    "single-conv": (SingleConvBackbone, "conv"),
    "multi-conv": (MultiConvBackbone, "conv"),
}
STATE_KINDS = ("dense", "conv")

#: the cell of the backbone models when none is named
DEFAULT_CELL = "pcdeq-1"


def _pcdeq_factory(variant: int) -> Callable[..., nn.Module]:
    def factory(state_shape: tuple[int, ...], name: str, **options: Any) -> nn.Module:
        solver_options, block_options = split_solver_options(options)
        config = SolverConfig(**solver_options)
        return pcdeq_cell(state_shape, name, variant=variant, config=config, **block_options)

    factory.__name__ = f"pcdeq_{variant}_cell"
    return factory


_PCDEQ_OPTIONS = (*_BLOCK_KEYS, *SolverConfig.field_names())
CELL_SPECS: dict[str, CellSpec] = {
    f"pcdeq-{variant}": CellSpec(
        name=f"pcdeq-{variant}",
        factory=_pcdeq_factory(variant),
        family="pcdeq",
        description=f"pcDEQ-{variant} block ({injection} injection, {act} by default); "
        "nonnegative W, dense or 3x3 conv",
        options=_PCDEQ_OPTIONS,
    )
    for variant, injection, act in ((1, "softplus", "tanh"), (2, "ReLU", "sigmoid"))
}


def build_on_backbone(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    cell: str = DEFAULT_CELL,
    **overrides: Any,
) -> ImplicitModel:
    """The backbone ``arch`` with the registered cell ``cell`` at every equilibrium layer.

    Args:
        arch: ``"linear"``, ``"single-conv"`` or ``"multi-conv"``.
        input_shape: ``(channels, height, width)``.
        num_classes: Number of classes.
        cell: Registered cell name (``list_cells()``).
        **overrides: ``width`` (linear, single conv) or ``widths`` (multi conv: 3 ints);
            conv backbones: ``memory_format``; everything else goes to the cell (its spec's
            ``options``).

    Raises:
        UnknownNameError: an unknown cell.
        ValueError: a cell that does not take this backbone's states, bad widths.
        TypeError: an option neither the backbone nor the cell takes (all valid ones listed).
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; available: {', '.join(BACKBONES)}")
    backbone, kind = BACKBONES[arch]
    spec = get_cell(cell)
    if kind not in spec.state_kinds:
        raise ValueError(
            f"cell {cell!r} does not fit the {arch} backbone: it takes "
            f"{' and '.join(spec.state_kinds)} states, the {arch} backbone has {kind} states"
        )
    size_key = "widths" if arch == "multi-conv" else "width"
    net_keys = (size_key,) if arch == "linear" else (size_key, "memory_format")
    unknown = sorted(set(overrides) - {*net_keys, *spec.options})
    if unknown:
        valid = ", ".join(sorted({*net_keys, *spec.options}))
        raise TypeError(
            f"{arch} with cell {cell!r}: unknown option(s) {', '.join(unknown)}; "
            f"valid options: {valid}"
        )
    size = overrides.pop(size_key, None)
    size = _check_widths(arch, _default_width(arch, input_shape) if size is None else size)
    net_options = {k: overrides.pop(k) for k in net_keys if k in overrides}
    builder = partial(spec.factory, **overrides)
    model = backbone(tuple(input_shape), num_classes, size, builder, **net_options)
    model.family = spec.family  # the report groups runs by the cell's family
    model.cell_name = cell
    return model


def _factory(arch: str) -> Callable[..., ImplicitModel]:
    def factory(
        input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
    ) -> ImplicitModel:
        return build_on_backbone(arch, input_shape, num_classes, **overrides)

    factory.__name__ = f"build_{arch.replace('-', '_')}"
    factory.__doc__ = f"The {arch} backbone with a registered cell (see :func:`build_on_backbone`)."
    return factory


def _presets(arch: str) -> dict[str, dict[str, Any]]:
    key = "widths" if arch == "multi-conv" else "width"
    return {name: {key: widths[arch]} for name, widths in _WIDTHS.items() if arch in widths}


MODEL_SPECS: dict[str, ModelSpec] = {
    arch: ModelSpec(
        name=arch,
        factory=_factory(arch),
        family="pcdeq",  # the default cell's; a model built with another cell reports that one's
        description=f"pcDEQ {arch} backbone with any registered cell (option cell=NAME, "
        f"default {DEFAULT_CELL})",
        presets=_presets(arch),
        # the pcDEQ recipe, which the comparison applies to every cell
        training=copy.deepcopy(TRAINING),
    )
    for arch in BACKBONES
}


@hookimpl
def pcdeq_register_cells() -> dict[str, CellSpec]:
    """The built-in pcDEQ cells, through the same hook as any plugin's."""
    return dict(CELL_SPECS)


@hookimpl
def pcdeq_register_models() -> dict[str, ModelSpec]:
    """The backbone models ``linear``, ``single-conv``, ``multi-conv`` (cell by option)."""
    return dict(MODEL_SPECS)
