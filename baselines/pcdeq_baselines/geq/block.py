"""The GEQ equilibrium layer: OptEq's linear kernel replaced by a Gaussian kernel.

Hidden objective (per sample; ``u = U x + b`` the input features, ``z >= 0`` the state,
``W`` a map from states to feature space, ``p`` the patches: one for the fully connected
layer, one per pixel for the convolutional one, features along channels)::

    E(z) = i_{z >= 0}(z) + 1/2 ||z||^2 - 1/(2 c) sum_p exp(-c ||u_p - (W z)_p||^2)

with ``c = kernel_gamma / D`` (``D`` feature channels). Its stationarity condition is the
equilibrium

    z = relu(W^T k(u - W z)),    k(v)_p = exp(-c ||v_p||^2) v_p.

``k`` is 1-Lipschitz (its Jacobian ``e^{-c r^2}(I - 2 c v v^T)`` has eigenvalues in
``[-2 e^{-3/2}, 1]``), so the map is a contraction with factor ``||W||^2`` whenever
``||W|| < 1``: unique equilibrium, reached by plain or Anderson iteration, and an adjoint
that converges too. The weight-normalised ``W = s V / (r ||V||_F)`` (``r = 1`` dense,
``r = sqrt(k_h k_w)`` for a convolution, which bounds its operator norm) with
``s = sqrt(contraction) * sigmoid(a)`` keeps ``||W||^2 < contraction`` for every value of
the parameters, so the certificate (:meth:`GEQBlock.contraction_bound`) always holds.

``kernel="linear"`` replaces ``k`` by the identity: ``z = relu(W^T (u - W z))``, the
OptEq-style linear-kernel layer GEQ improves on (same guarantee).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitBlock, SolverConfig, solve_implicit
from pcdeq_plugin.implicit import make_solvers

from ..options import check_choice, check_positive_number

__all__ = ["GEQ_SOLVER", "KERNELS", "GEQBlock", "GEQConvBlock", "GEQLinearBlock"]

KERNELS: tuple[str, ...] = ("gaussian", "linear")

#: Anderson forward (as in the paper); the backward is the exact implicit (adjoint) solve
#: with the same solver instead of the paper's phantom gradient.
GEQ_SOLVER = SolverConfig(
    solver="anderson", tol=1e-4, max_iter=50, on_failure="warn", solver_options={"memory": 5}
)


class GEQBlock(ImplicitBlock):
    """Base class: subclasses give ``U`` (injection), ``V`` (unnormalised ``W``) and the
    products with ``W`` / ``W^T``.

    Args:
        kernel: ``"gaussian"`` (GEQ) or ``"linear"`` (OptEq-style).
        kernel_gamma: Gaussian width ``gamma`` on the mean squared feature distance.
        contraction: Bound on the layer's Lipschitz constant, in (0, 1).
        config: Solver settings.
        name: Block name in statistics and messages.
    """

    norm_factor = 1.0

    def __init__(
        self,
        *,
        kernel: str = "gaussian",
        kernel_gamma: float = 1.0,
        contraction: float = 0.9,
        config: SolverConfig = GEQ_SOLVER,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.kernel = check_choice("kernel", kernel, KERNELS)
        self.kernel_gamma = check_positive_number("kernel_gamma", kernel_gamma)
        contraction = check_positive_number("contraction", contraction)
        if contraction >= 1:
            raise ValueError(f"contraction must be in (0, 1), got {contraction!r}")
        self.contraction = contraction
        if not isinstance(config, SolverConfig):
            raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
        make_solvers(config)  # unknown solver names or options fail at build time
        self.config = config
        self.gain = nn.Parameter(torch.zeros(()))  # s = sqrt(contraction) * sigmoid(gain)

    def scale(self) -> torch.Tensor:
        """``s``: the bound on ``||W||`` for the current parameters."""
        return math.sqrt(self.contraction) * torch.sigmoid(self.gain)

    def weight(self) -> torch.Tensor:
        v = self.V.weight
        return self.scale() * v / (self.norm_factor * v.norm())

    @torch.no_grad()
    def contraction_bound(self) -> float:
        """``s^2 >= ||W||^2``: a Lipschitz bound of the layer map (< ``contraction`` < 1)."""
        return float(self.scale()) ** 2

    def _kernel(self, v: torch.Tensor) -> torch.Tensor:
        if self.kernel == "linear":
            return v
        c = self.kernel_gamma / v.shape[1]  # features along dim 1 (channels)
        return torch.exp(-c * v.square().sum(dim=1, keepdim=True)) * v

    def layer(self, z: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.apply_transpose(self._kernel(u - self.apply(z, w)), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.injection(x)
        w = self.weight()
        z0 = torch.zeros(self.state_shape(u), dtype=u.dtype, device=u.device)
        return solve_implicit(lambda z: self.layer(z, u, w), z0, self.config, self.last_stats)

    # provided by subclasses
    def injection(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_transpose(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_shape(self, u: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError


class GEQLinearBlock(GEQBlock):
    """Fully connected GEQ on flattened inputs: ``width`` states, ``width`` features."""

    def __init__(self, in_features: int, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.U = nn.Linear(in_features, width)
        self.V = nn.Linear(width, width, bias=False)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(x.flatten(1))

    def apply(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return z @ w.T

    def apply_transpose(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v @ w

    def state_shape(self, u: torch.Tensor) -> tuple[int, ...]:
        return (u.shape[0], self.V.in_features)


class GEQConvBlock(GEQBlock):
    """Convolutional GEQ: 3x3 "same" convolutions, one Gaussian kernel per pixel."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.pad = kernel_size // 2
        self.norm_factor = float(kernel_size)  # sqrt(k * k) bounds the operator norm
        self.U = nn.Conv2d(in_channels, channels, kernel_size, padding=self.pad)
        self.V = nn.Conv2d(channels, channels, kernel_size, padding=self.pad, bias=False)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(x)

    def apply(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, padding=self.pad)

    def apply_transpose(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(v, w, padding=self.pad)

    def state_shape(self, u: torch.Tensor) -> tuple[int, ...]:
        return (u.shape[0], self.V.in_channels, u.shape[2], u.shape[3])
