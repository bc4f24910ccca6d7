"""The SubDEQ layer (Sittoni & Tudisco, ICML 2024), its solve and its certificate.

The layer of the released models (reference baselines.md section 5.2)::

    F(z) = tanh(W z) + relu(U x + b) + c                    plain,      c = 1.2
    G(z) = F(z) / ||F(z)||_inf   (per sample)               normalised, c = 1.603

with an *unconstrained* recurrent weight ``W`` (dense, or a 3x3 "same" convolution). The
state lives in the positive cone; the solve is Anderson-accelerated from the all-ones start
(memory 5, lam 1e-4, beta 1, tol 1e-3, 30 iterations), and the backward pass solves the
adjoint fixed point with the same solver (:func:`pcdeq_plugin.solve_implicit`).

Theory (reference section 5.1): if ``F`` is mu-subhomogeneous, i.e. ``|F'(z)| z <= mu F(z)``
entrywise, it is a mu-contraction of the Thompson metric; ``mu < 1`` (plain) or
``mu < 1/2`` (normalised: normalising at most doubles the constant) gives a unique positive
fixed point that iteration from any positive start reaches. The shifts are chosen so that
the *activation's* coefficient ``sup_t |t s'(t)| / s(t)`` of ``s = tanh + c`` sits just
below these thresholds (0.999 for 1.2, 0.499 for 1.603). For a mixed-sign ``W``, however,
``|F'(z)| z`` involves ``|W| z`` rather than ``|W z|``, so the layer's coefficient depends
on the weights; :meth:`SubDEQBlock.certificate` reports a bound on it for the current
weights (see :class:`SubhomogeneityCertificate`) so a user sees when the guarantee no
longer applies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitBlock, SolverConfig, solve_implicit
from pcdeq_plugin.implicit import make_solvers

from ..options import check_flag
from .certificate import SubhomogeneityCertificate, activation_coefficient, tanh_slope_bound

__all__ = [
    "NORMALIZED_SHIFT",
    "PLAIN_SHIFT",
    "SUBDEQ_SOLVER",
    "SubDEQBlock",
    "SubDEQConvBlock",
    "SubDEQLinearBlock",
]

#: Shift of the plain SubDEQ activation ``tanh + c`` (coefficient just below 1).
PLAIN_SHIFT = 1.2
#: Shift of the normalised SubDEQ activation (coefficient just below 1/2).
NORMALIZED_SHIFT = 1.603

#: The released solver settings: Anderson, memory 5, lam 1e-4, beta 1, tol 1e-3, 30 steps.
SUBDEQ_SOLVER = SolverConfig(
    solver="anderson",
    tol=1e-3,
    max_iter=30,
    on_failure="warn",
    solver_options={"memory": 5, "lam": 1e-4, "beta": 1.0},
)


class SubDEQBlock(ImplicitBlock):
    """A SubDEQ layer ``z = tanh(W z) + relu(U x + b) + shift`` (optionally normalised).

    Subclasses provide the injection ``U`` and the recurrent operator ``W`` (dense or
    convolutional) through :meth:`injection`, :meth:`recurrent` and :meth:`recurrent_parts`.

    Args:
        shift: The activation shift ``c > 1``; ``None`` picks 1.2 (plain) or 1.603
            (normalised).
        normalize: Divide by the per-sample infinity norm after each application.
        config: The solver settings (default: the released Anderson settings).
        name: Block name used in statistics and messages.
    """

    def __init__(
        self,
        *,
        shift: float | None = None,
        normalize: bool = False,
        config: SolverConfig = SUBDEQ_SOLVER,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if shift is None:
            shift = NORMALIZED_SHIFT if normalize else PLAIN_SHIFT
        self.activation_coefficient = activation_coefficient(shift)  # validates shift
        if not isinstance(config, SolverConfig):
            raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
        make_solvers(config)  # unknown solver names or options fail here, not at the first batch
        self.shift = float(shift)
        self.normalize = check_flag("normalize", normalize)
        self.config = config
        self._last_injection: torch.Tensor | None = None
        self._last_fixed_point: torch.Tensor | None = None

    # -- the operators, provided by subclasses -----------------------------------------
    def injection(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def recurrent(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def recurrent_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W+ z, W- z)`` with ``W = W+ - W-`` the positive and negative parts."""
        raise NotImplementedError

    def recurrent_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def state_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    # -- the layer ---------------------------------------------------------------------
    def layer(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One application of the layer to the state ``z`` given the injection ``y >= 0``."""
        out = torch.tanh(self.recurrent(z)) + y + self.shift
        if self.normalize:
            # out > 0 (tanh > -1, shift > 1, y >= 0), so the infinity norm is the maximum
            out = out / out.flatten(1).amax(dim=1).view(-1, *([1] * (out.dim() - 1)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.injection(x)
        z0 = torch.ones(self.state_shape(x), dtype=y.dtype, device=y.device)
        z = solve_implicit(lambda s: self.layer(s, y), z0, self.config, self.last_stats)
        self._last_injection = y.detach()
        self._last_fixed_point = z.detach()
        return z

    @torch.no_grad()
    def certificate(self, x: torch.Tensor | None = None) -> SubhomogeneityCertificate:
        """The subhomogeneity certificate for the current weights.

        Args:
            x: Inputs to evaluate the (input-dependent) bound on; ``None`` uses the
                injection of the last forward pass, or a zero injection before the first.
        """
        weight = self.recurrent_weight()
        if x is not None:
            y = self.injection(x)
        elif self._last_injection is not None:  # (the module may have moved since)
            y = self._last_injection.to(device=weight.device, dtype=weight.dtype)
        else:
            y = weight.new_zeros(self.state_shape(torch.zeros(1)))
        # F maps the cone into the box [shift - 1 + y, shift + 1 + y]; the normalised map
        # evaluates F on states with infinity norm 1, i.e. inside (0, 1].
        z_hi = torch.ones_like(y) if self.normalize else y + self.shift + 1.0
        pos, neg = self.recurrent_parts(z_hi)
        cancel = torch.minimum(pos, neg) * tanh_slope_bound(y + self.shift)
        layer = self.activation_coefficient + 2.0 * float(cancel.flatten(1).amax(dim=1).max())
        local = float("nan")
        if self._last_fixed_point is not None and self._last_injection is not None:
            z = self._last_fixed_point.to(device=weight.device, dtype=weight.dtype)
            y_last = self._last_injection.to(device=weight.device, dtype=weight.dtype)
            pos, neg = self.recurrent_parts(z)
            t = pos - neg
            fz = torch.tanh(t) + y_last + self.shift
            local = float(((1.0 - torch.tanh(t) ** 2) * (pos + neg) / fz).max())
        threshold = 0.5 if self.normalize else 1.0
        return SubhomogeneityCertificate(
            activation_coefficient=self.activation_coefficient,
            layer_coefficient=layer,
            threshold=threshold,
            guaranteed=layer < threshold,
            local_coefficient=local,
            nonnegative_weights=bool((weight >= 0).all()),
        )


class SubDEQLinearBlock(SubDEQBlock):
    """Fully connected SubDEQ layer on flattened inputs."""

    def __init__(self, in_features: int, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.U = nn.Linear(in_features, width)
        self.W = nn.Linear(width, width, bias=False)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.U(x.flatten(1)))

    def recurrent(self, z: torch.Tensor) -> torch.Tensor:
        return self.W(z)

    def recurrent_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.W.weight
        return F.linear(z, w.clamp(min=0)), F.linear(z, (-w).clamp(min=0))

    def recurrent_weight(self) -> torch.Tensor:
        return self.W.weight

    def state_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], self.W.in_features)


class SubDEQConvBlock(SubDEQBlock):
    """Convolutional SubDEQ layer: 3x3 "same" (zero-padded) convolutions."""

    def __init__(
        self, in_channels: int, channels: int, kernel_size: int = 3, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.U = nn.Conv2d(in_channels, channels, kernel_size, padding=pad)
        self.W = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.U(x))

    def recurrent(self, z: torch.Tensor) -> torch.Tensor:
        return self.W(z)

    def recurrent_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # with zero padding, the operator's entries are the kernel's entries (or 0), so its
        # positive/negative parts are the convolutions with the kernel's parts
        w, pad = self.W.weight, self.W.padding
        return F.conv2d(z, w.clamp(min=0), padding=pad), F.conv2d(z, (-w).clamp(min=0), padding=pad)

    def recurrent_weight(self) -> torch.Tensor:
        return self.W.weight

    def state_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if x.dim() != 4:
            # certificate() without inputs: the centre pixel of a kernel-sized image sees
            # every kernel entry, the worst case of the bound
            return (1, self.W.in_channels, *self.W.kernel_size)
        return (x.shape[0], self.W.in_channels, x.shape[2], x.shape[3])
