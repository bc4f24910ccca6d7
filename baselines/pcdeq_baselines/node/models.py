"""NODE and ANODE baselines: convolutional neural ODEs solved by torchdiffeq.

The models follow the image experiments of the ANODE paper (Dupont, Doucet & Teh, 2019),
which is also what the monDEQ and pcDEQ tables call "Neural ODE" and "Aug. Neural ODE":

* the ODE state is the image itself, ``h(0) = x`` (NODE) or ``h(0) = [x; 0_p]`` with ``p``
  zero channels appended (ANODE); there is no down-sampling stem;
* the dynamics are ``conv1x1 -> ReLU -> conv3x3 -> ReLU -> conv1x1``, each convolution
  receiving the time ``t`` as one extra constant input channel;
* ``h(1)`` is flattened and read out by one linear layer.

Solving (defaults as in the ANODE code): ``dopri5`` on ``[0, 1]`` with
``rtol = atol = 1e-3``, ``max_num_steps = 1000`` and the adjoint method
(``adjoint=True``); ``adjoint=False`` backpropagates through the solver's operations instead.
Any torchdiffeq method can be chosen by name (``method="rk4", ode_options={"step_size": 0.25}``).
The solve, its NFE statistics and what happens when it fails (it is recorded, and training
goes on) are described in :mod:`pcdeq_baselines.node.block`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitModel, ModelSpec
from pcdeq_plugin.recipes import TrainingRecipe

from ..options import (
    check_choice,
    check_count,
    check_flag,
    check_input_shape,
    check_overrides,
    is_mnist_like,
)
from .block import ODEBlock

__all__ = [
    "MODEL_SPECS",
    "NONLINEARITIES",
    "ConvODEFunc",
    "NeuralODEClassifier",
    "build_anode",
    "build_node",
]

NONLINEARITIES = {"relu": F.relu, "softplus": F.softplus, "tanh": torch.tanh}


class _TimeConv(nn.Conv2d):
    """A convolution that sees the time ``t`` as one extra constant input channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__(in_channels + 1, out_channels, kernel_size, padding=padding)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t_channel = torch.ones_like(h[:, :1]) * t.to(h.dtype)
        return super().forward(torch.cat([t_channel, h], dim=1))


class ConvODEFunc(nn.Module):
    """ANODE's image dynamics: ``conv1x1 -> ReLU -> conv3x3 -> ReLU -> conv1x1``.

    Args:
        channels: Channels of the ODE state (image channels plus augmented channels).
        hidden: Width of the two hidden convolutions.
        time_dependent: Give every convolution the time as an extra input channel.
        nonlinearity: ``"relu"`` (the papers) or a smooth alternative, ``"softplus"`` (also
            offered by the ANODE code) or ``"tanh"``. ReLU makes the dynamics non-smooth,
            which costs adaptive solvers many steps at tight tolerances.
    """

    def __init__(
        self, channels: int, hidden: int, *, time_dependent: bool = True, nonlinearity: str = "relu"
    ) -> None:
        super().__init__()
        check_count("channels", channels)
        check_count("hidden", hidden)
        self.act = NONLINEARITIES[check_choice("nonlinearity", nonlinearity, NONLINEARITIES)]
        self.time_dependent = check_flag("time_dependent", time_dependent)
        if time_dependent:
            self.conv1 = _TimeConv(channels, hidden, 1)
            self.conv2 = _TimeConv(hidden, hidden, 3, padding=1)
            self.conv3 = _TimeConv(hidden, channels, 1)
        else:
            self.conv1 = nn.Conv2d(channels, hidden, 1)
            self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.conv3 = nn.Conv2d(hidden, channels, 1)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            h = self.act(self.conv1(t, h))
            h = self.act(self.conv2(t, h))
            return self.conv3(t, h)
        return self.conv3(self.act(self.conv2(self.act(self.conv1(h)))))


class NeuralODEClassifier(ImplicitModel):
    """NODE (``augment_channels=0``) or ANODE: an ODE flow on the image, then a linear read-out.

    Args:
        input_shape: ``(channels, height, width)``.
        num_classes: Output classes.
        hidden: Width of the dynamics' hidden convolutions.
        augment_channels: Zero channels appended to the input (ANODE's ``p``).
        time_dependent: Time as an extra input channel of every convolution.
        nonlinearity: Activation of the dynamics (``"relu"``, ``"softplus"``, ``"tanh"``).
        **solver_options: Keyword options of :class:`ODEBlock` (``method``, ``rtol``,
            ``atol``, ``adjoint``, ``max_num_steps``, ``ode_options``, ``on_failure``).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        hidden: int,
        augment_channels: int = 0,
        time_dependent: bool = True,
        nonlinearity: str = "relu",
        **solver_options: Any,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        check_count("augment_channels", augment_channels, 0)
        check_count("hidden", hidden)
        self.family = "anode" if augment_channels > 0 else "node"
        self.input_shape = tuple(input_shape)
        self.augment_channels = augment_channels
        state_channels = channels + augment_channels
        odefunc = ConvODEFunc(
            state_channels, hidden, time_dependent=time_dependent, nonlinearity=nonlinearity
        )
        self.block = ODEBlock(odefunc, **solver_options)
        self.head = nn.Linear(state_channels * height * width, num_classes)

    @property
    def odefunc(self) -> nn.Module:
        """The dynamics (stored once, in the block, so the state dict has no duplicate keys)."""
        return self.block.func

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, self.family)
        h0 = x
        if self.augment_channels:
            zeros = x.new_zeros(x.shape[0], self.augment_channels, *x.shape[2:])
            h0 = torch.cat([x, zeros], dim=1)
        return self.head(self.block(h0).flatten(1))


_SOLVER_KEYS = ("method", "rtol", "atol", "adjoint", "max_num_steps", "ode_options", "on_failure")


def _build(
    input_shape: tuple[int, int, int],
    num_classes: int,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    model: str,
) -> NeuralODEClassifier:
    valid = {*defaults, *_SOLVER_KEYS, "time_dependent", "nonlinearity", "t_end"}
    check_overrides(model, overrides, valid)
    return NeuralODEClassifier(input_shape, num_classes, **{**defaults, **overrides})


#: the paper sizes (ANODE code, quoted by monDEQ's Table 1), by input kind; the presets
#: below name the same values per dataset
_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "node": {"mnist": {"hidden": 92}, "color": {"hidden": 125}},
    "anode": {
        "mnist": {"hidden": 64, "augment_channels": 5},
        "color": {"hidden": 64, "augment_channels": 10},
    },
}


def _default_sizes(model: str, input_shape: tuple[int, int, int]) -> dict[str, int]:
    # the same rule as the monDEQ/SubDEQ/GEQ factories: MNIST sizes for 1-channel <= 28x28
    return dict(_SIZES[model]["mnist" if is_mnist_like(input_shape) else "color"])


def build_node(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> NeuralODEClassifier:
    """NODE: the ANODE-code image ODE without augmentation.

    Without a preset the size follows the input shape, as for the other families: MNIST-like
    inputs get ``hidden=92`` (84K parameters), others ``hidden=125`` (172K on 3x32x32).
    """
    return _build(input_shape, num_classes, _default_sizes("node", input_shape), overrides, "node")


def build_anode(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> NeuralODEClassifier:
    """ANODE: ``augment_channels`` zero channels appended.

    Without a preset the size follows the input shape: MNIST-like inputs get ``hidden=64,
    p=5`` (84K parameters), others ``hidden=64, p=10`` (172K on 3x32x32).
    """
    defaults = _default_sizes("anode", input_shape)
    return _build(input_shape, num_classes, defaults, overrides, "anode")


# "small": one epoch over 4,000 MNIST images at batch 64 on 2 CPU cores in well under a
# minute. The paper-size models need 15-26 s per batch of 32 on CPU, so the small preset
# uses 8 hidden channels, looser tolerances (1e-2), and direct backpropagation (one VJP per
# recorded evaluation; cheaper than re-solving the adjoint ODE at this size).
_SMALL = {"rtol": 1e-2, "atol": 1e-2, "adjoint": False}

_ODE_TRAINING = TrainingRecipe(
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    batch_size=256,
    epochs=20,
    source="ANODE config_img.json (MNIST); no input normalisation or augmentation",
)

MODEL_SPECS: dict[str, ModelSpec] = {
    "node": ModelSpec(
        name="node",
        factory=build_node,
        family="node",
        description="Neural ODE on the image (ANODE code, p=0): conv ODE, dopri5, linear read-out",
        presets={
            "mnist": dict(_SIZES["node"]["mnist"]),  # 85,316 parameters ("84K")
            "svhn": dict(_SIZES["node"]["color"]),  # 173,611 ("172K")
            "cifar10": dict(_SIZES["node"]["color"]),
            "small": {"hidden": 8, **_SMALL},
        },
        training=_ODE_TRAINING,
    ),
    "anode": ModelSpec(
        name="anode",
        factory=build_anode,
        family="anode",
        description="Augmented neural ODE: p zero channels appended, conv ODE, dopri5, linear read-out",
        presets={
            "mnist": dict(_SIZES["anode"]["mnist"]),  # 85,462 ("84K")
            "svhn": dict(_SIZES["anode"]["color"]),  # 172,452 ("172K")
            "cifar10": dict(_SIZES["anode"]["color"]),
            "small": {"hidden": 8, "augment_channels": 2, **_SMALL},
        },
        training=_ODE_TRAINING,
    ),
}
