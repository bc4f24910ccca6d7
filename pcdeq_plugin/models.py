"""The paper's six pcDEQ classifiers, registered by name.

``pcdeq-linear-{1,2}``, ``pcdeq-single-conv-{1,2}``, ``pcdeq-multi-conv-{1,2}`` follow the
official architectures (pcdeq.md section 2.2); ``-1`` uses pcDEQ-1 blocks (softplus
injection, ``tanh`` by default), ``-2`` pcDEQ-2 blocks (ReLU injection, ``sigmoid``). With
the official widths the parameter counts equal the official ones: MNIST 70,410 (linear),
69,136 (single conv), 41,278 (multi conv); SVHN/CIFAR-10 164,760 (single conv), 130,950
(multi conv); CIFAR-10 with augmentation 661,470 (multi conv 100/120/140).

Widths default from the input shape (1 channel -> MNIST widths, otherwise SVHN/CIFAR-10
widths); presets ``"mnist"``, ``"svhn"``, ``"cifar10"``, ``"cifar10-aug"`` (multi conv only)
and ``"small"`` (size-reduced for quick CPU runs) override them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .backbones import (
    MEMORY_FORMATS,
    LinearBackbone,
    MultiConvBackbone,
    SingleConvBackbone,
    check_memory_format,
    resolve_memory_format,
)
from .cells import PcDEQBlock, PcDEQConv, PcDEQLinear
from .checks import ArgumentError, check_count, check_known_keys, is_count
from .hookspecs import hookimpl
from .interface import ImplicitModel, SolverConfig, split_solver_options
from .recipes import RecipeOverride, TrainingRecipe
from .specs import ModelSpec

__all__ = [
    # the memory-format helpers live with the backbones; named here too, as they were
    # defined here before the backbones were shared
    "MEMORY_FORMATS",
    "MODEL_SPECS",
    "PcDEQLinearNet",
    "PcDEQMultiConvNet",
    "PcDEQSingleConvNet",
    "build_pcdeq",
    "check_memory_format",
    "pcdeq_cell",
    "resolve_memory_format",
]

# keyword overrides passed to every block; the SolverConfig fields are collected into its config
_BLOCK_KEYS = (
    "activation",
    "beta",
    "injection_floor",
    "constraint",
    "init_scale",
    "check_inputs",
)


def pcdeq_cell(state_shape: tuple[int, ...], name: str, **options: Any) -> PcDEQBlock:
    """A pcDEQ block for ``state_shape``: dense for ``(width,)``, 3x3 conv for ``(C, H, W)``.

    ``options`` are :class:`~pcdeq_plugin.cells.PcDEQBlock`'s (``variant``, ``activation``,
    ``config``, ...).
    """
    if len(state_shape) == 1:
        return PcDEQLinear(state_shape[0], name=name, **options)
    return PcDEQConv(state_shape[0], name=name, **options)


class PcDEQLinearNet(LinearBackbone):
    """flatten -> Linear -> BN -> pcDEQ (dense) -> BN -> Linear classifier."""

    family = "pcdeq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__(input_shape, num_classes, width, partial(pcdeq_cell, **block_kwargs))


class PcDEQSingleConvNet(SingleConvBackbone):
    """conv3x3 -> BN -> pcDEQ (conv) -> maxpool(3,1,1) -> BN -> avgpool(8) -> Linear."""

    family = "pcdeq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        memory_format: str = "auto",
        **block_kwargs: Any,
    ) -> None:
        cell = partial(pcdeq_cell, **block_kwargs)
        super().__init__(input_shape, num_classes, width, cell, memory_format)


class PcDEQMultiConvNet(MultiConvBackbone):
    """Three conv pcDEQ blocks, each followed by maxpool and BN, joined by strided convs."""

    family = "pcdeq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        widths: Sequence[int],
        memory_format: str = "auto",
        **block_kwargs: Any,
    ) -> None:
        cell = partial(pcdeq_cell, **block_kwargs)
        super().__init__(input_shape, num_classes, widths, cell, memory_format)


# -- widths, presets, factories -------------------------------------------------------------

_WIDTHS: dict[str, dict[str, Any]] = {
    # dataset -> architecture -> official widths
    "mnist": {"linear": 80, "single-conv": 82, "multi-conv": (12, 24, 48)},
    "svhn": {"single-conv": 125, "multi-conv": (20, 50, 80)},
    "cifar10": {"single-conv": 125, "multi-conv": (20, 50, 80)},
    "cifar10-aug": {"multi-conv": (100, 120, 140)},
    # size-reduced: one epoch over 4,000 MNIST images at batch 64 well under a minute on CPU
    "small": {"linear": 64, "single-conv": 16, "multi-conv": (8, 16, 32)},
}

_WIDTH_KEY = {"linear": "width", "single-conv": "width", "multi-conv": "widths"}
_NETS: dict[str, type[ImplicitModel]] = {
    "linear": PcDEQLinearNet,
    "single-conv": PcDEQSingleConvNet,
    "multi-conv": PcDEQMultiConvNet,
}

# The official README commands: AdamW, one LR milestone (gamma 0.1), batch 64; the MNIST
# command is also the default of datasets without their own (mnist5k, cifar10-aug).
TRAINING = TrainingRecipe(
    optimizer="adamw",
    lr=5e-4,
    weight_decay=1.5e-2,
    batch_size=64,
    epochs=40,
    milestones=(30,),
    gamma=0.1,
    per_dataset={
        "mnist": RecipeOverride(weight_decay=1.5e-2, epochs=40, milestones=(30,)),
        "svhn": RecipeOverride(weight_decay=2e-2, epochs=80, milestones=(70,)),
        "cifar10": RecipeOverride(weight_decay=2e-2, epochs=120, milestones=(100,)),
    },
    source="official pcDEQ README (github.com/mateuszgabor/pcdeq)",
)


def _default_width(arch: str, input_shape: tuple[int, int, int]) -> Any:
    dataset = "mnist" if input_shape[0] == 1 or arch == "linear" else "svhn"
    return _WIDTHS[dataset][arch]


def _check_widths(arch: str, value: Any) -> Any:
    if arch == "multi-conv":
        ok = isinstance(value, Sequence) and len(value) == 3 and all(is_count(w) for w in value)
        if not ok:
            raise ArgumentError(f"widths must be three integers >= 1, got {value!r}")
        return tuple(value)
    if isinstance(value, Sequence) and len(value) == 1:
        value = value[0]
    return check_count("width", value)


def build_pcdeq(
    arch: str, variant: int, input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> ImplicitModel:
    """Build one of the paper's networks.

    Args:
        arch: ``"linear"``, ``"single-conv"`` or ``"multi-conv"``.
        variant: pcDEQ variant of every block (1 or 2).
        input_shape: ``(channels, height, width)``.
        num_classes: Number of classes.
        **overrides: ``width`` (linear, single conv) or ``widths`` (multi conv: 3 ints);
            block options ``activation``, ``beta``, ``injection_floor``, ``constraint``,
            ``init_scale``,
            ``check_inputs``; convolutional networks: ``memory_format`` (``"auto"``,
            ``"channels_last"``, ``"contiguous"``, see :func:`resolve_memory_format`);
            solver options: every :class:`~pcdeq_plugin.SolverConfig` field (``solver``,
            ``tol``, ``max_iter``, ``backward_*``, ``check_every``, ``on_failure``,
            ``solver_options``, ``warm_start``, ``warm_tol``, ``warm_refine``, ``adjoint``,
            ``reuse_step_graph``).

    Raises:
        TypeError: an unknown override (the message lists the valid keys).
        ValueError: unknown architecture, bad widths, or an activation that does not fit.
    """
    if arch not in _NETS:
        raise ValueError(f"unknown pcDEQ architecture {arch!r}; available: {', '.join(_NETS)}")
    width_keys = ("width", "widths") if arch != "multi-conv" else ("widths",)
    net_keys = ("memory_format",) if arch != "linear" else ()
    valid = (*width_keys, *net_keys, *_BLOCK_KEYS, *SolverConfig.field_names())
    solver_options, rest = split_solver_options(overrides)
    check_known_keys(rest, sorted(valid), owner=f"pcdeq-{arch}-{variant}")
    given = [k for k in width_keys if k in overrides]
    if len(given) > 1:
        raise TypeError("give either width or widths, not both")
    widths = overrides[given[0]] if given else _default_width(arch, input_shape)
    widths = _check_widths(arch, widths)
    config = SolverConfig(**solver_options)
    block_kwargs = {k: rest[k] for k in _BLOCK_KEYS if k in rest}
    net_kwargs = {k: rest[k] for k in net_keys if k in rest}
    return _NETS[arch](
        tuple(input_shape),
        num_classes,
        widths,
        variant=variant,
        config=config,
        **net_kwargs,
        **block_kwargs,
    )


def _factory(arch: str, variant: int) -> Callable[..., ImplicitModel]:
    def factory(
        input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
    ) -> ImplicitModel:
        return build_pcdeq(arch, variant, input_shape, num_classes, **overrides)

    factory.__name__ = f"pcdeq_{arch.replace('-', '_')}_{variant}"
    factory.__doc__ = f"pcDEQ-{variant} {arch} network (see :func:`build_pcdeq`)."
    return factory


def _presets(arch: str) -> dict[str, dict[str, Any]]:
    key = _WIDTH_KEY[arch]
    return {name: {key: widths[arch]} for name, widths in _WIDTHS.items() if arch in widths}


_DESCRIPTIONS = {
    "linear": "flatten-Linear-BN-pcDEQ(dense)-BN-Linear (MNIST 70,410 params)",
    "single-conv": "conv-BN-pcDEQ(conv)-maxpool-BN-avgpool-Linear (MNIST 69,136; 32x32 164,760)",
    "multi-conv": "3 conv pcDEQ blocks with strided convs (MNIST 41,278; 32x32 130,950)",
}

MODEL_SPECS: dict[str, ModelSpec] = {
    f"pcdeq-{arch}-{variant}": ModelSpec(
        name=f"pcdeq-{arch}-{variant}",
        factory=_factory(arch, variant),
        family="pcdeq",
        description=f"pcDEQ-{variant} {_DESCRIPTIONS[arch]}",
        presets=_presets(arch),
        training=copy.deepcopy(TRAINING),  # each spec owns its dict
    )
    for arch in _NETS
    for variant in (1, 2)
}


@hookimpl
def pcdeq_register_models() -> dict[str, ModelSpec]:
    """The six pcDEQ networks, registered through the same hook as any plugin."""
    return dict(MODEL_SPECS)
