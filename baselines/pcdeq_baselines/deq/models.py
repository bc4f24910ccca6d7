"""Unconstrained DEQ baselines through TorchDEQ: the "no guarantees" reference.

The networks mirror the pcDEQ backbones (linear, single conv, multi conv; same layers,
widths and parameter counts as the official pcDEQ code), but each equilibrium layer is an
ordinary DEQ cell

    z = act(W z + b + u(x))

with an unconstrained recurrent weight ``W``, an ordinary bias ``b``, the pre-injection
``u(x)`` used as it is (no positivity map) and an ordinary activation (``tanh`` by
default). Nothing guarantees that a fixed point exists or that the solver finds it, so
every solve's outcome is recorded; the cell, its TorchDEQ solve, its initialisation and
its statistics are described in :mod:`pcdeq_baselines.deq.block`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from pcdeq_plugin import ImplicitModel, ModelSpec
from pcdeq_plugin.backbones import LinearBackbone, MultiConvBackbone, SingleConvBackbone
from pcdeq_plugin.models import TRAINING as PCDEQ_TRAINING

from ..options import check_counts, check_input_shape, check_overrides
from .block import UnconstrainedDEQBlock

__all__ = [
    "MODEL_SPECS",
    "UnconstrainedDEQLinear",
    "UnconstrainedDEQMultiConv",
    "UnconstrainedDEQSingleConv",
    "build_deq_linear",
    "build_deq_multi_conv",
    "build_deq_single_conv",
    "deq_cell",
]

_BLOCK_KEYS = (
    "activation",
    "solver",
    "backward_solver",
    "tol",
    "max_iter",
    "backward_tol",
    "backward_max_iter",
    "solver_options",
    "on_failure",
    "recurrent_init",
)


def deq_cell(
    state_shape: tuple[int, ...], name: str, **block_options: Any
) -> UnconstrainedDEQBlock:
    """The unconstrained DEQ cell for ``state_shape``.

    ``(width,)``: ``W`` is an ``nn.Linear(width, width)``; ``(C, H, W)``: a shape-preserving
    3x3 ``nn.Conv2d(C, C)``; both with an ordinary bias (where pcDEQ has its weight-norm
    gain, hence the same parameter counts). ``block_options`` are
    :class:`UnconstrainedDEQBlock`'s.
    """
    width = state_shape[0]
    layer = (
        nn.Linear(width, width) if len(state_shape) == 1 else nn.Conv2d(width, width, 3, padding=1)
    )
    return UnconstrainedDEQBlock(layer, name=name, **block_options)


#: module names of the deq-* models before they shared the pcDEQ backbones (old -> new), so
#: their checkpoints still load
OLD_MODULE_NAMES: dict[str, dict[str, str]] = {
    "deq-linear": {
        "embed": "linear1",
        "bn_in": "bn1",
        "deq": "block",
        "bn_out": "bn2",
        "head": "classifier",
    },
    "deq-single-conv": {
        "embed": "conv1",
        "bn_in": "bn1",
        "deq": "block",
        "bn_out": "bn2",
        "head": "classifier",
    },
    "deq-multi-conv": {
        "stage1.0": "conv1",
        "stage1.1": "bn1",
        "deq1": "block1",
        "stage2.1": "bn2",
        "stage2.2": "downsample1",
        "stage2.3": "bn3",
        "deq2": "block2",
        "stage3.1": "bn4",
        "stage3.2": "downsample2",
        "stage3.3": "bn5",
        "deq3": "block3",
        "tail.1": "bn6",
        "head": "classifier",
    },
}


def _rename_old_keys(module: _DEQEntry, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # a load_state_dict pre-hook: rewrites old names in place before the modules read them
    for old, new in OLD_MODULE_NAMES[module.model_name].items():
        old_prefix = f"{prefix}{old}."
        for key in [k for k in state_dict if k.startswith(old_prefix)]:
            state_dict[f"{prefix}{new}.{key[len(old_prefix) :]}"] = state_dict.pop(key)


class _DEQEntry:
    """The unconstrained models' input check (their own wording, the baselines' helper) and
    the loading of checkpoints written under their old module names."""

    input_shape: tuple[int, ...]
    model_name: str

    def _accept_old_names(self) -> None:
        self._register_load_state_dict_pre_hook(_rename_old_keys, with_module=True)  # type: ignore[attr-defined]

    def check_input(self, x: torch.Tensor) -> None:
        check_input_shape(x, self.input_shape, self.model_name)

    @property
    def deq(self) -> nn.Module:
        """The (first) equilibrium block, by the name it had before the shared backbones."""
        return self.block if hasattr(self, "block") else self.block1  # type: ignore[attr-defined]


class UnconstrainedDEQLinear(_DEQEntry, LinearBackbone):
    """The pcDEQ linear backbone (:class:`~pcdeq_plugin.backbones.LinearBackbone`) with
    the unconstrained cell.

    Args:
        input_shape: ``(channels, height, width)``.
        num_classes: Output classes.
        width: Width of the equilibrium state.
        **block_options: Options of :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"
    model_name = "deq-linear"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 80,
        **block_options: Any,
    ) -> None:
        (width,) = check_counts("width", width, 1)
        cell = partial(deq_cell, **block_options)
        super().__init__(tuple(input_shape), num_classes, width, cell)
        self._accept_old_names()


class UnconstrainedDEQSingleConv(_DEQEntry, SingleConvBackbone):
    """The pcDEQ single-conv backbone (:class:`~pcdeq_plugin.backbones.SingleConvBackbone`)
    with the unconstrained cell.

    Args:
        input_shape: ``(channels, height, width)``.
        num_classes: Output classes.
        width: Channels of the equilibrium state.
        memory_format: ``"auto"``, ``"channels_last"`` or ``"contiguous"``, as for pcDEQ.
        **block_options: Options of :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"
    model_name = "deq-single-conv"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 82,
        memory_format: str = "auto",
        **block_options: Any,
    ) -> None:
        (width,) = check_counts("width", width, 1)
        cell = partial(deq_cell, **block_options)
        super().__init__(tuple(input_shape), num_classes, width, cell, memory_format)
        self._accept_old_names()


class UnconstrainedDEQMultiConv(_DEQEntry, MultiConvBackbone):
    """The pcDEQ multi-conv backbone (:class:`~pcdeq_plugin.backbones.MultiConvBackbone`)
    with three unconstrained cells.

    Args:
        input_shape: ``(channels, height, width)``; at least 7x7.
        num_classes: Output classes.
        widths: Channels of the three equilibrium states.
        memory_format: ``"auto"``, ``"channels_last"`` or ``"contiguous"``, as for pcDEQ.
        **block_options: Options of every :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"
    model_name = "deq-multi-conv"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        widths: Sequence[int] = (12, 24, 48),
        memory_format: str = "auto",
        **block_options: Any,
    ) -> None:
        widths = check_counts("widths", widths, 3)
        cell = partial(deq_cell, **block_options)
        super().__init__(tuple(input_shape), num_classes, widths, cell, memory_format)
        self._accept_old_names()


def _factory(cls: type[ImplicitModel], model: str, size_key: str) -> Callable[..., ImplicitModel]:
    layout = () if cls is UnconstrainedDEQLinear else ("memory_format",)  # conv nets only
    valid = (size_key, *layout, *_BLOCK_KEYS)

    def build(
        input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
    ) -> ImplicitModel:
        check_overrides(model, overrides, valid)
        return cls(tuple(input_shape), num_classes, **overrides)

    build.__name__ = f"build_{model.replace('-', '_')}"
    build.__doc__ = f"Build {model!r}: ``factory(input_shape, num_classes, **overrides)``."
    return build


build_deq_linear = _factory(UnconstrainedDEQLinear, "deq-linear", "width")
build_deq_single_conv = _factory(UnconstrainedDEQSingleConv, "deq-single-conv", "width")
build_deq_multi_conv = _factory(UnconstrainedDEQMultiConv, "deq-multi-conv", "widths")


# The pcDEQ recipe (official README examples) on every dataset, so the comparison differs
# only in the cell.
_TRAINING = dataclasses.replace(
    PCDEQ_TRAINING,
    notes={"schedule": "multistep, gamma 0.1 at one milestone"},
    source="pcDEQ README (mateuszgabor/pcdeq); applied unchanged to the unconstrained cell",
)

MODEL_SPECS: dict[str, ModelSpec] = {
    "deq-linear": ModelSpec(
        name="deq-linear",
        factory=build_deq_linear,
        family="deq",
        description="Unconstrained DEQ, pcDEQ linear backbone, TorchDEQ Anderson + IFT",
        presets={"mnist": {"width": 80}, "small": {"width": 64}},  # mnist: 70,410 parameters
        training=_TRAINING,
    ),
    "deq-single-conv": ModelSpec(
        name="deq-single-conv",
        factory=build_deq_single_conv,
        family="deq",
        description="Unconstrained DEQ, pcDEQ single-conv backbone, TorchDEQ Anderson + IFT",
        presets={
            "mnist": {"width": 82},  # 69,136 parameters
            "svhn": {"width": 125},  # 164,760
            "cifar10": {"width": 125},
            # pcDEQ's small preset uses 16 channels; the unconstrained cell needs 2-3x more
            # solver iterations by the end of a small epoch (about 57 s of CPU at 16), so 8.
            "small": {"width": 8},
        },
        training=_TRAINING,
    ),
    "deq-multi-conv": ModelSpec(
        name="deq-multi-conv",
        factory=build_deq_multi_conv,
        family="deq",
        description="Unconstrained DEQ, pcDEQ multi-conv backbone (3 DEQs), TorchDEQ Anderson + IFT",
        presets={
            "mnist": {"widths": (12, 24, 48)},  # 41,278 parameters
            "svhn": {"widths": (20, 50, 80)},  # 130,950
            "cifar10": {"widths": (20, 50, 80)},
            "cifar10-aug": {"widths": (100, 120, 140)},  # 661,470
            "small": {"widths": (8, 16, 32)},
        },
        training=_TRAINING,
    ),
}
