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
from typing import Any

import torch
from torch import nn

from .cells import PcDEQConv, PcDEQLinear
from .checks import (
    ArgumentError,
    all_finite,
    check_choice,
    check_count,
    check_known_keys,
    is_count,
)
from .hookspecs import hookimpl
from .interface import ImplicitModel, SolverConfig, split_solver_options
from .registry import ModelSpec

__all__ = [
    "MODEL_SPECS",
    "PcDEQLinearNet",
    "PcDEQMultiConvNet",
    "PcDEQSingleConvNet",
    "build_pcdeq",
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


class PcDEQLinearNet(ImplicitModel):
    """flatten -> Linear -> BN -> pcDEQ (dense) -> BN -> Linear classifier."""

    family = "pcdeq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        in_features = int(torch.Size(input_shape).numel())
        self.input_shape = tuple(input_shape)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(in_features, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.block = PcDEQLinear(width, name="block", **block_kwargs)
        self.bn2 = nn.BatchNorm1d(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, self.input_shape)
        x = self.bn1(self.linear1(self.flatten(x)))
        return self.classifier(self.bn2(self.block(x)))


#: ``memory_format`` values of the convolutional networks
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")
_TORCH_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def check_memory_format(value: object) -> str:
    """``value`` if it names a memory layout (see :data:`MEMORY_FORMATS`), else a clear error."""
    return check_choice("memory_format", value, MEMORY_FORMATS)


def resolve_memory_format(choice: str, device: torch.device) -> torch.memory_format:
    """The layout a convolutional network computes in on ``device``.

    ``"auto"`` is channels-last on the CPU (oneDNN convolutions, BatchNorm and pooling run
    NHWC natively: an 82-channel 3x3 convolution at 28x28 took 70 ms NHWC against 119 ms
    NCHW here, and bfloat16 needs NHWC for AMX) and on CUDA (tensor-core convolutions are
    NHWC); NCHW elsewhere.
    """
    if choice == "auto":
        return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    return _TORCH_FORMATS[choice]


class _ConvNet(ImplicitModel):
    """A convolutional pcDEQ network: inputs are laid out in the chosen memory format."""

    family = "pcdeq"

    def __init__(self, memory_format: str = "auto") -> None:
        super().__init__()
        self.memory_format = check_memory_format(memory_format)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # Every later activation (cells, BatchNorm, pools, the solver's states) inherits
        # the layout. Applied to the input and again to the stem's output: a 1-channel
        # image is NCHW and NHWC at once, and its convolution would answer in NCHW.
        return x.contiguous(memory_format=resolve_memory_format(self.memory_format, x.device))


class PcDEQSingleConvNet(_ConvNet):
    """conv3x3 -> BN -> pcDEQ (conv) -> maxpool(3,1,1) -> BN -> avgpool(8) -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        memory_format: str = "auto",
        **block_kwargs: Any,
    ) -> None:
        super().__init__(memory_format)
        channels, height, width_px = input_shape
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.block = PcDEQConv(width, name="block", **block_kwargs)
        self.max_pool = nn.MaxPool2d(3, 1, 1)
        self.bn2 = nn.BatchNorm2d(width)
        # the official AvgPool2d(8) (28 -> 3x3, 32 -> 4x4); smaller inputs pool what they have
        kernel = (min(8, height), min(8, width_px))
        self.avg_pool = nn.AvgPool2d(kernel)
        self.flatten = nn.Flatten()
        pooled = (height // kernel[0]) * (width_px // kernel[1])
        self.classifier = nn.Linear(width * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, self.input_shape)
        x = self.block(self.bn1(self._layout(self.conv1(self._layout(x)))))
        x = self.avg_pool(self.bn2(self.max_pool(x)))
        return self.classifier(self.flatten(x))


class PcDEQMultiConvNet(_ConvNet):
    """Three conv pcDEQ blocks, each followed by maxpool and BN, joined by strided convs."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        widths: Sequence[int],
        memory_format: str = "auto",
        **block_kwargs: Any,
    ) -> None:
        super().__init__(memory_format)
        channels, height, width_px = input_shape
        if min(height, width_px) < 7:
            raise ValueError(
                f"the multi-conv pcDEQ net needs inputs of at least 7x7 (two stride-2 3x3 "
                f"convolutions without padding), got {height}x{width_px}"
            )
        ch1, ch2, ch3 = widths
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(channels, ch1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch1)
        self.block1 = PcDEQConv(ch1, name="block1", **block_kwargs)
        self.bn2 = nn.BatchNorm2d(ch1)
        self.downsample1 = nn.Conv2d(ch1, ch2, 3, stride=2)
        self.bn3 = nn.BatchNorm2d(ch2)
        self.block2 = PcDEQConv(ch2, name="block2", **block_kwargs)
        self.bn4 = nn.BatchNorm2d(ch2)
        self.downsample2 = nn.Conv2d(ch2, ch3, 3, stride=2)
        self.bn5 = nn.BatchNorm2d(ch3)
        self.block3 = PcDEQConv(ch3, name="block3", **block_kwargs)
        self.bn6 = nn.BatchNorm2d(ch3)
        self.max_pool = nn.MaxPool2d(3, 1, 1)
        # 28 -> 13 -> 6 and 32 -> 15 -> 7; the official AvgPool2d(4) then gives 1x1
        final = [((s - 3) // 2 + 1 - 3) // 2 + 1 for s in (height, width_px)]
        kernel = (min(4, final[0]), min(4, final[1]))
        self.avg_pool = nn.AvgPool2d(kernel)
        self.flatten = nn.Flatten()
        pooled = (final[0] // kernel[0]) * (final[1] // kernel[1])
        self.classifier = nn.Linear(ch3 * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, self.input_shape)
        x = self.block1(self.bn1(self._layout(self.conv1(self._layout(x)))))
        x = self.bn2(self.max_pool(x))
        x = self.block2(self.bn3(self.downsample1(x)))
        x = self.bn4(self.max_pool(x))
        x = self.block3(self.bn5(self.downsample2(x)))
        x = self.bn6(self.max_pool(x))
        return self.classifier(self.flatten(self.avg_pool(x)))


def _check_image_batch(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(input_shape) or x.dim() != 4:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"expected a batch of images of shape [batch, {', '.join(map(str, input_shape))}], "
            f"got {got}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point batch of images, got dtype {x.dtype} (convert with "
            "x.float(), scaled as the model was trained)"
        )
    if x.shape[0] == 0:
        raise ValueError("expected a non-empty batch of images, got batch size 0")
    # checked here, before the stem: a NaN reaching a training-mode BatchNorm would poison
    # its running statistics, so every later clean input would be refused too
    if not all_finite(x):
        finite = torch.isfinite(x)
        bad = int((~finite).sum())
        sample = int(torch.nonzero(~finite.flatten(1).all(dim=1))[0, 0])
        raise ValueError(
            f"the batch of images contains {bad} NaN/Inf value(s) (first in sample {sample}); "
            "nothing was updated -- clean or drop those inputs"
        )


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

_DATASET_RECIPES = {
    # the official README commands: AdamW, one LR milestone (gamma 0.1), batch 64
    "mnist": {"weight_decay": 1.5e-2, "epochs": 40, "milestones": [30]},
    "svhn": {"weight_decay": 2e-2, "epochs": 80, "milestones": [70]},
    "cifar10": {"weight_decay": 2e-2, "epochs": 120, "milestones": [100]},
}
TRAINING: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 5e-4,
    "weight_decay": 1.5e-2,
    "batch_size": 64,
    "epochs": 40,
    "milestones": [30],
    "gamma": 0.1,
    "per_dataset": _DATASET_RECIPES,
    "source": "official pcDEQ README (github.com/mateuszgabor/pcdeq)",
}


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
            ``solver_options``, ``warm_start``, ``warm_tol``, ``adjoint``,
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
