"""monDEQ's linear parts: ``W = (1 - m) I - A^T A + B - B^T`` and its resolvents.

Every operator here acts on a *state*, a tuple of tensors (one per resolution tier; one
element for the fully connected and single-convolution models), and provides

* ``injection(x)``: ``U x + b`` (per tier; zeros on the tiers that see no input),
* ``multiply(z)`` / ``multiply_transpose(z)``: ``W z`` and ``W^T z``,
* ``resolvent(alpha)``: an object applying ``V = (I + alpha (I - W))^-1`` and ``V^T``,
  built from the *current* weights (rebuild it after every weight change),
* ``interior_masks(...)``: which entries the nonlinearity may leave nonzero (the
  convolutional states carry a one-pixel border forced to zero, see below).

Because ``(I - W) + (I - W)^T = 2 (m I + A^T A)``, ``I - W`` is strongly monotone with
constant ``m`` for any ``A`` and ``B``: the equilibrium exists and is unique
(Winston & Kolter, NeurIPS 2020, Theorems 1-2).

Convolutional models use *circular* 3x3 convolutions, so the DFT block-diagonalises them
and ``V`` costs one ``C x C`` inverse per spatial frequency (:mod:`.fft`). To keep
the wrap-around from mixing opposite image edges, the input is zero-padded by one pixel and
the nonlinearity forces the one-pixel border of the state to zero (a projection onto a
convex set, hence still a proximal operator, so the theory is untouched).

The weight-normalised parametrisation of the convolutional models (paper section 3 /
appendix): ``A^T A -> g A^T A / ||A||^2`` and ``B -> h B / ||B||`` with learned scalars
``g`` and ``h``; the multi-tier model scales every kernel of ``A`` by ``sqrt(g) / ||.||``.
:meth:`project` keeps ``g >= 0`` (and the multi-tier ``g`` strictly positive), the region
where the parametrisation is monotone (resp. defined); it is inactive in normal training,
where ``g`` starts at 1. As in the released code, the fully connected operator uses raw
``A`` and ``B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fft import (
    circular_conv,
    circular_conv_transpose,
    conv_transfer,
)

__all__ = [
    "MonFcOperator",
    "MonSingleConvOperator",
    "MonotoneOperator",
    "State",
    "border_mask",
    "eye_like",
    "hermitian",
    "unit",
]

State = tuple[torch.Tensor, ...]


def border_mask(size: tuple[int, int], *, like: torch.Tensor) -> torch.Tensor:
    """``[1, 1, h, w]`` mask: 1 inside, 0 on the one-pixel border."""
    mask = like.new_zeros(1, 1, *size)
    mask[..., 1:-1, 1:-1] = 1
    return mask


def eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def unit(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm()


def hermitian(t: torch.Tensor) -> torch.Tensor:
    """Conjugate transpose of the trailing matrices, materialised (see :func:`conv_transfer`)."""
    return t.transpose(-1, -2).conj().resolve_conj().contiguous()


class MonotoneOperator(nn.Module):
    """Base class: ``W = (1 - m) I - A^T A + B - B^T`` on a tuple-of-tensors state."""

    def __init__(self, m: float) -> None:
        super().__init__()
        if not (isinstance(m, (int, float)) and m > 0):
            raise ValueError(f"the monotonicity parameter m must be > 0, got {m!r}")
        self.m = float(m)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def injection(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def multiply(self, z: State) -> State:
        raise NotImplementedError

    def multiply_transpose(self, z: State) -> State:
        raise NotImplementedError

    def resolvent(self, alpha: float) -> Resolvent:
        raise NotImplementedError

    def interior_masks(self, like: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return tuple(None for _ in self.state_shapes(1))

    def project(self) -> None:
        """Keep the parametrisation in its monotone region (after an optimizer step)."""


class Resolvent:
    """Applies ``V = (I + alpha (I - W))^-1`` and ``V^T`` to states."""

    def apply(self, r: State) -> State:
        raise NotImplementedError

    def apply_transpose(self, r: State) -> State:
        raise NotImplementedError


# -- fully connected ---------------------------------------------------------------------


class _DenseResolvent(Resolvent):
    def __init__(self, inverse: torch.Tensor) -> None:
        self.inverse = inverse

    def apply(self, r: State) -> State:
        return (r[0] @ self.inverse.T,)

    def apply_transpose(self, r: State) -> State:
        return (r[0] @ self.inverse,)


class MonFcOperator(MonotoneOperator):
    """Dense monotone operator on ``width`` units; the input is flattened."""

    def __init__(self, in_features: int, width: int, m: float = 1.0) -> None:
        super().__init__(m)
        self.U = nn.Linear(in_features, width)
        self.A = nn.Linear(width, width, bias=False)
        self.B = nn.Linear(width, width, bias=False)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(batch, self.A.in_features)]

    def injection(self, x: torch.Tensor) -> State:
        return (self.U(x.flatten(1)),)

    def multiply(self, z: State) -> State:
        a, b = self.A.weight, self.B.weight
        v = z[0]
        return ((1 - self.m) * v - (v @ a.T) @ a + v @ b.T - v @ b,)

    def multiply_transpose(self, z: State) -> State:
        a, b = self.A.weight, self.B.weight
        v = z[0]
        return ((1 - self.m) * v - (v @ a.T) @ a - v @ b.T + v @ b,)

    def dense_weight(self) -> torch.Tensor:
        """``W`` as a matrix (rows act on column vectors)."""
        a, b = self.A.weight, self.B.weight
        return (1 - self.m) * eye_like(a.shape[0], a) - a.T @ a + b - b.T

    def resolvent(self, alpha: float) -> Resolvent:
        a, b = self.A.weight, self.B.weight
        eye = eye_like(a.shape[0], a)
        system = (1 + alpha * self.m) * eye + alpha * (a.T @ a - b + b.T)
        return _DenseResolvent(torch.linalg.inv(system))


# -- single circular convolution ----------------------------------------------------------


class _FourierResolvent(Resolvent):
    """Per-frequency inverse of a single circular-convolution operator (half spectrum)."""

    def __init__(self, inverse: torch.Tensor, size: tuple[int, int]) -> None:
        self.inverse = inverse  # [h, w//2 + 1, C, C]
        self.size = size
        self._inverse_h: torch.Tensor | None = None  # built on the first transposed apply

    def _multiply(self, matrices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # a real operator's output spectrum is Hermitian, so half of it suffices (rfft2)
        x_hat = torch.fft.rfft2(x).permute(2, 3, 1, 0).contiguous()
        out = (matrices @ x_hat).permute(3, 2, 0, 1)
        return torch.fft.irfft2(out, s=self.size)

    def apply(self, r: State) -> State:
        return (self._multiply(self.inverse, r[0]),)

    def apply_transpose(self, r: State) -> State:
        if self._inverse_h is None:
            self._inverse_h = hermitian(self.inverse)
        return (self._multiply(self._inverse_h, r[0]),)


class MonSingleConvOperator(MonotoneOperator):
    """``W`` built from one circular 3x3 convolution pair on an ``h x w`` state.

    Args:
        in_channels: Input channels.
        channels: State channels.
        size: State size ``(h, w)``: the input size plus the two border pixels.
        m: Monotonicity parameter.
        kernel_size: Odd kernel size (3 in the paper).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        m: float = 1.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(m)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.size = (int(size[0]), int(size[1]))
        self.U = nn.Conv2d(in_channels, channels, kernel_size)
        self.A = nn.Conv2d(channels, channels, kernel_size, bias=False)
        self.B = nn.Conv2d(channels, channels, kernel_size, bias=False)
        self.g = nn.Parameter(torch.tensor(1.0))
        self.h = nn.Parameter(torch.tensor(1.0))

    def kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight-normalised kernels ``(A / ||A||, h B / ||B||)``."""
        return unit(self.A.weight), self.h * unit(self.B.weight)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(batch, self.A.in_channels, *self.size)]

    def interior_masks(self, like: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (border_mask(self.size, like=like),)

    def injection(self, x: torch.Tensor) -> State:
        padded = F.pad(x, (1, 1, 1, 1))  # zero border: see the module docstring
        return (circular_conv(padded, self.U.weight) + self.U.bias.view(1, -1, 1, 1),)

    def _product(self, z: State, transpose: bool) -> State:
        a, b = self.kernels()
        v = z[0]
        ata = circular_conv_transpose(circular_conv(v, a), a)
        skew = circular_conv(v, b) - circular_conv_transpose(v, b)
        if transpose:
            skew = -skew
        return ((1 - self.m) * v - self.g * ata + skew,)

    def multiply(self, z: State) -> State:
        return self._product(z, transpose=False)

    def multiply_transpose(self, z: State) -> State:
        return self._product(z, transpose=True)

    def resolvent(self, alpha: float) -> Resolvent:
        a, b = self.kernels()
        ta = conv_transfer(a, self.size, half=True)
        tb = conv_transfer(b, self.size, half=True)
        eye = eye_like(ta.shape[-1], ta)
        system = (1 + alpha * self.m) * eye + alpha * (
            self.g * hermitian(ta) @ ta - tb + hermitian(tb)
        )
        return _FourierResolvent(torch.linalg.inv(system), self.size)

    def project(self) -> None:
        with torch.no_grad():
            self.g.clamp_(min=0.0)
