"""LBEN's linear parts, written as monDEQ operators so that one splitting code solves both.

The LBEN layer (Revay, Wang & Manchester 2020) is ``z = relu(W z + U x + b)`` with the
direct parametrisation

    W = I - Psi H,   Psi = diag(exp(psi)),   Lambda = Psi^-1,
    H = m I + A^T A - B + B^T + (G^T G + Lambda U U^T Lambda) / (2 gamma),

where ``G`` is the output layer (``y = G z + b_y``). Then
``2 Lambda - Lambda W - W^T Lambda - G^T G / gamma - Lambda U U^T Lambda / gamma
= 2 (m I + A^T A) > 0``: the Schur complement of the paper's Lipschitz LMI, so the layer is
well posed and ``||y1 - y2|| <= gamma ||x1 - x2||`` (l2, in the model's input space). Without
a bound (``gamma=None``) the two ``1/gamma`` terms drop and ``H`` is monDEQ's ``I - W``;
with ``Psi = I`` as well, LBEN *is* monDEQ.

Why these operators look like monDEQ's: for a positive diagonal ``Psi`` and the ReLU (a
normal-cone resolvent, unchanged by a positive diagonal scaling),

    z = relu(z - Psi (H z - Lambda u))   <=>   z = relu(z - (H z - Lambda u)),

so the LBEN equilibrium is exactly the monDEQ equilibrium of ``W' = I - H`` with the
injection ``Lambda u`` (``u = U x + b``). ``H + H^T >= 2 m I``, so ``W'`` is a monotone
monDEQ operator and :mod:`pcdeq_baselines.mondeq.splitting` (forward-backward, Peaceman-Rachford, the
Theorem-3 backward) applies unchanged. The same fixed point means the same function of the
parameters, hence the same implicit gradients. (The released LBEN code iterates on ``W``
itself in the ``Lambda``-weighted metric; the iterates differ, the equilibrium does not.)
The per-sample residual the statistics record is that of the ``W'`` form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..mondeq.fft import circular_conv, circular_conv_transpose
from ..mondeq.ops import (
    MonFcOperator,
    MonSingleConvOperator,
    Resolvent,
    State,
    _DenseResolvent,
    eye_like,
)

__all__ = ["DENSE_LIMIT", "METRICS", "LbenConvOperator", "LbenFcOperator", "pool_adjoint"]

#: Largest per-sample state (entries) for which a convolutional LBEN with a Lipschitz bound
#: builds ``(I + alpha H)^-1`` densely, so that Peaceman-Rachford is available (tiny models).
DENSE_LIMIT = 1024

#: Shapes of the convolutional metric ``Psi``: per channel and pixel, per channel, per
#: pixel, or the identity (no parameter: the monDEQ metric).
METRICS: tuple[str, ...] = ("full", "channels", "image", "identity")


class LbenFcOperator(MonFcOperator):
    """Fully connected LBEN: ``H`` as above on ``width`` units; owns the output layer ``G``.

    Args:
        in_features: Flattened input size.
        width: Hidden units.
        num_classes: Outputs of ``G``.
        gamma: The Lipschitz bound, or ``None`` for the unbounded LBEN.
        m: Monotonicity parameter.
    """

    def __init__(
        self, in_features: int, width: int, num_classes: int, gamma: float | None, m: float = 1.0
    ) -> None:
        super().__init__(in_features, width, m=m)
        self.G = nn.Linear(width, num_classes)
        self.psi = nn.Parameter(torch.zeros(width))
        self.gamma = gamma

    def metric_inverse(self) -> torch.Tensor:
        """``Lambda = exp(-psi)`` (the diagonal of ``Psi^-1``)."""
        return torch.exp(-self.psi)

    def injection(self, x: torch.Tensor) -> State:
        return (self.metric_inverse() * self.U(x.flatten(1)),)

    def _h_product(self, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        a, b = self.A.weight, self.B.weight
        skew = v @ b - v @ b.T  # rows: (B^T - B) v
        out = self.m * v + (v @ a.T) @ a + (-skew if transpose else skew)
        if self.gamma is not None:
            lam = self.metric_inverse()
            g, u = self.G.weight, self.U.weight
            out = out + ((v @ g.T) @ g + lam * (((v * lam) @ u) @ u.T)) / (2 * self.gamma)
        return out

    def multiply(self, z: State) -> State:
        return (z[0] - self._h_product(z[0], transpose=False),)

    def multiply_transpose(self, z: State) -> State:
        return (z[0] - self._h_product(z[0], transpose=True),)

    def h_matrix(self) -> torch.Tensor:
        """``H`` as a matrix acting on column vectors."""
        eye = eye_like(self.A.weight.shape[0], self.A.weight)
        return self._h_product(eye, transpose=False).T

    def dense_weight(self) -> torch.Tensor:
        """``W' = I - H``, the operator the splitting iterates on."""
        h = self.h_matrix()
        return eye_like(h.shape[0], h) - h

    def lben_weight(self) -> torch.Tensor:
        """The LBEN's own ``W = I - Psi H``."""
        h = self.h_matrix()
        return eye_like(h.shape[0], h) - torch.exp(self.psi)[:, None] * h

    def resolvent(self, alpha: float) -> Resolvent:
        h = self.h_matrix()
        return _DenseResolvent(torch.linalg.inv(eye_like(h.shape[0], h) + alpha * h))


def pool_adjoint(y: torch.Tensor, pool: int, size: tuple[int, int]) -> torch.Tensor:
    """Adjoint of ``avg_pool2d(., pool)`` on ``size`` images (the remainder rows get zeros)."""
    up = y.repeat_interleave(pool, dim=-2).repeat_interleave(pool, dim=-1) / pool**2
    return F.pad(up, (0, size[1] - up.shape[-1], 0, size[0] - up.shape[-2]))


class LbenConvOperator(MonSingleConvOperator):
    """Single circular-convolution LBEN (monDEQ's weight-normalised ``A``, ``B``, ``g``, ``h``).

    The output map is ``y = G flatten(avg_pool(z, pool))``; ``U U^T`` uses the circular
    convolution on the padded grid, which bounds the true input map's ``U U^T`` (the zero
    padding is an isometric embedding), so the certificate stays valid.

    Args:
        in_channels, channels, size, m: As for :class:`MonSingleConvOperator`.
        num_classes: Outputs of ``G``.
        gamma: The Lipschitz bound, or ``None`` for the unbounded LBEN.
        pool: Average-pooling factor of the read-out.
        metric: Shape of ``Psi``, one of :data:`METRICS`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        num_classes: int,
        gamma: float | None,
        *,
        pool: int,
        metric: str = "full",
        m: float = 0.1,
    ) -> None:
        super().__init__(in_channels, channels, size, m=m)
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
        self.metric, self.pool, self.gamma = metric, pool, gamma
        h, w = self.size
        shape = {
            "full": (1, channels, h, w),
            "channels": (1, channels, 1, 1),
            "image": (1, 1, h, w),
            "identity": None,
        }[metric]
        self.psi = None if shape is None else nn.Parameter(torch.zeros(shape))
        self.pooled = (h // pool, w // pool)
        self.G = nn.Linear(channels * self.pooled[0] * self.pooled[1], num_classes)

    def metric_inverse(self) -> torch.Tensor | float:
        return 1.0 if self.psi is None else torch.exp(-self.psi)

    def read_out(self, z: torch.Tensor) -> torch.Tensor:
        """``G flatten(avg_pool(z))`` (the logits, bias included)."""
        return self.G(F.avg_pool2d(z, self.pool).flatten(1))

    def injection(self, x: torch.Tensor) -> State:
        return (self.metric_inverse() * super().injection(x)[0],)

    def _lipschitz_terms(self, v: torch.Tensor) -> torch.Tensor:
        """``(G_o^T G_o + Lambda U U^T Lambda) v / (2 gamma)``, ``G_o = G flatten pool``."""
        lam = self.metric_inverse()
        g = self.G.weight
        pooled = F.avg_pool2d(v, self.pool).flatten(1)
        gtg = pool_adjoint(
            ((pooled @ g.T) @ g).view(-1, v.shape[1], *self.pooled), self.pool, self.size
        )
        u = self.U.weight
        uut = lam * circular_conv(circular_conv_transpose(lam * v, u), u)
        return (gtg + uut) / (2 * self.gamma)

    def _product(self, z: State, transpose: bool) -> State:
        (wz,) = super()._product(z, transpose)  # (1 - m) z - g A^T A z +- (B - B^T) z
        if self.gamma is not None:
            wz = wz - self._lipschitz_terms(z[0])
        return (wz,)

    def resolvent(self, alpha: float) -> Resolvent:
        if self.gamma is None:
            return super().resolvent(alpha)  # H is a circular convolution: the FFT inverse
        shape = tuple(self.state_shapes(1)[0][1:])
        n = math.prod(shape)
        if n > DENSE_LIMIT:
            raise ValueError(
                "lben-conv: Peaceman-Rachford needs (I + alpha (I - W))^-1, which the FFT "
                "gives only for convolutions; the Lipschitz terms (pooled read-out, metric) "
                f"are not convolutions, and a dense inverse is built only up to {DENSE_LIMIT} "
                f"state entries (this model has {n}). Use splitting='forward-backward' (the "
                "paper's choice for convolutional LBENs) or gamma=None"
            )
        eye = eye_like(n, self.G.weight)
        h = eye - self.multiply((eye.reshape(n, *shape),))[0].reshape(n, n).T
        return _FlatResolvent(torch.linalg.inv(eye + alpha * h), shape)


class _FlatResolvent(_DenseResolvent):
    """A dense inverse applied to image-shaped states."""

    def __init__(self, inverse: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__(inverse)
        self.shape = shape

    def apply(self, r: State) -> State:
        return (super().apply((r[0].flatten(1),))[0].view(-1, *self.shape),)

    def apply_transpose(self, r: State) -> State:
        return (super().apply_transpose((r[0].flatten(1),))[0].view(-1, *self.shape),)
