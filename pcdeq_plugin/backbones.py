"""The three classifier backbones of the pcDEQ paper, with the implicit cell as a parameter.

``LinearBackbone``, ``SingleConvBackbone`` and ``MultiConvBackbone`` hold every layer of the
official pcDEQ architectures (pcdeq.md section 2.2) except the equilibrium layers, which a
:data:`CellBuilder` makes for the state shape each position needs. The pcDEQ networks
(:mod:`.models`), the unconstrained DEQ baseline and any registered cell (:mod:`.cell_models`)
are these classes with different cells, so a head-to-head comparison differs only in the
cell by construction.

Module names are the pcDEQ networks' (``linear1``, ``bn1``, ``block``, ...), so their state
dicts are unchanged by the refactor that introduced this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .checks import all_finite, check_choice
from .interface import ImplicitModel
from .norms import LayoutBatchNorm2d
from .pooling import SameMaxPool2d

__all__ = [
    "MEMORY_FORMATS",
    "CellBuilder",
    "ConvBackbone",
    "LinearBackbone",
    "MultiConvBackbone",
    "SingleConvBackbone",
    "check_image_batch",
    "check_memory_format",
    "multi_conv_state_sizes",
    "resolve_memory_format",
]

#: ``builder(state_shape, name) -> implicit block``: ``state_shape`` is ``(width,)`` for a
#: dense state and ``(channels, height, width)`` for a convolutional one; the block maps a
#: tensor ``[B, *state_shape]`` to its equilibrium of the same shape.
CellBuilder = Callable[[tuple[int, ...], str], nn.Module]

#: ``memory_format`` values of the convolutional backbones
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


def check_image_batch(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    """Refuse anything but a non-empty, finite, floating-point batch ``[B, *input_shape]``."""
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


class _Backbone(ImplicitModel):
    """What every backbone shares: the input shape and the check of an input batch."""

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse a bad input batch; a family may override this to word its own errors."""
        check_image_batch(x, self.input_shape)


class LinearBackbone(_Backbone):
    """flatten -> Linear -> BN -> cell (dense, ``(width,)``) -> BN -> Linear classifier."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int, cell: CellBuilder
    ) -> None:
        super().__init__(input_shape)
        in_features = int(torch.Size(input_shape).numel())
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(in_features, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.block = cell((width,), "block")
        self.bn2 = nn.BatchNorm1d(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.bn1(self.linear1(self.flatten(x)))
        return self.classifier(self.bn2(self.block(x)))


class ConvBackbone(_Backbone):
    """A convolutional backbone: inputs are laid out in the chosen memory format."""

    def __init__(self, input_shape: tuple[int, int, int], memory_format: str = "auto") -> None:
        super().__init__(input_shape)
        self.memory_format = check_memory_format(memory_format)

    def _batch_norm(self, channels: int) -> LayoutBatchNorm2d:
        # under "auto" a small-channel BatchNorm may train in NCHW (see norms.py)
        return LayoutBatchNorm2d(channels, auto_layout=self.memory_format == "auto")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # Every later activation (cells, BatchNorm, pools, the solver's states) inherits
        # the layout. Applied to the input and again to the stem's output (a no-op when
        # the stem answered in the layout already).
        memory_format = resolve_memory_format(self.memory_format, x.device)
        if memory_format == torch.channels_last and x.shape[1] == 1 and x.is_contiguous():
            # A 1-channel image is NCHW and NHWC at once, and PyTorch reads it as NCHW, so
            # the stem's convolution would answer in NCHW and its output (and gradient)
            # would be copied to NHWC. The same memory viewed with NHWC strides (the
            # channel's stride 1) makes the stem answer in NHWC, 1.6-3x faster forward and
            # about 2x backward here (`benchmarks/bench_kernels.py --sections stem`).
            batch, _, height, width = x.shape
            return x.view(batch, height, width, 1).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=memory_format)


class SingleConvBackbone(ConvBackbone):
    """conv3x3 -> BN -> cell (``(width, H, W)``) -> maxpool(3,1,1) -> BN -> avgpool(8) -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        cell: CellBuilder,
        memory_format: str = "auto",
    ) -> None:
        super().__init__(input_shape, memory_format)
        channels, height, width_px = input_shape
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = self._batch_norm(width)
        self.block = cell((width, height, width_px), "block")
        self.max_pool = SameMaxPool2d()
        self.bn2 = self._batch_norm(width)
        # the official AvgPool2d(8) (28 -> 3x3, 32 -> 4x4); smaller inputs pool what they have
        kernel = (min(8, height), min(8, width_px))
        self.avg_pool = nn.AvgPool2d(kernel)
        self.flatten = nn.Flatten()
        pooled = (height // kernel[0]) * (width_px // kernel[1])
        self.classifier = nn.Linear(width * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.block(self.bn1(self._layout(self.conv1(self._layout(x)))))
        x = self.avg_pool(self.bn2(self.max_pool(x)))
        return self.classifier(self.flatten(x))


def multi_conv_state_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial sizes of the three states of :class:`MultiConvBackbone` (28 -> 28, 13, 6)."""
    if min(height, width) < 7:
        raise ValueError(
            f"the multi-conv backbone needs inputs of at least 7x7 (two stride-2 3x3 "
            f"convolutions without padding), got {height}x{width}"
        )
    sizes = [(height, width)]
    for _ in range(2):
        sizes.append(tuple((s - 3) // 2 + 1 for s in sizes[-1]))  # type: ignore[arg-type]
    return sizes


class MultiConvBackbone(ConvBackbone):
    """Three cells, each followed by maxpool and BN, joined by strided convs."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        widths: Sequence[int],
        cell: CellBuilder,
        memory_format: str = "auto",
    ) -> None:
        super().__init__(input_shape, memory_format)
        channels, height, width_px = input_shape
        (h1, w1), (h2, w2), final = multi_conv_state_sizes(height, width_px)
        ch1, ch2, ch3 = widths
        self.conv1 = nn.Conv2d(channels, ch1, 3, padding=1)
        self.bn1 = self._batch_norm(ch1)
        self.block1 = cell((ch1, h1, w1), "block1")
        self.bn2 = self._batch_norm(ch1)
        self.downsample1 = nn.Conv2d(ch1, ch2, 3, stride=2)
        self.bn3 = self._batch_norm(ch2)
        self.block2 = cell((ch2, h2, w2), "block2")
        self.bn4 = self._batch_norm(ch2)
        self.downsample2 = nn.Conv2d(ch2, ch3, 3, stride=2)
        self.bn5 = self._batch_norm(ch3)
        self.block3 = cell((ch3, *final), "block3")
        self.bn6 = self._batch_norm(ch3)
        self.max_pool = SameMaxPool2d()
        # 28 -> 13 -> 6 and 32 -> 15 -> 7; the official AvgPool2d(4) then gives 1x1
        kernel = (min(4, final[0]), min(4, final[1]))
        self.avg_pool = nn.AvgPool2d(kernel)
        self.flatten = nn.Flatten()
        pooled = (final[0] // kernel[0]) * (final[1] // kernel[1])
        self.classifier = nn.Linear(ch3 * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.block1(self.bn1(self._layout(self.conv1(self._layout(x)))))
        x = self.bn2(self.max_pool(x))
        x = self.block2(self.bn3(self.downsample1(x)))
        x = self.bn4(self.max_pool(x))
        x = self.block3(self.bn5(self.downsample2(x)))
        x = self.bn6(self.max_pool(x))
        return self.classifier(self.flatten(self.avg_pool(x)))
