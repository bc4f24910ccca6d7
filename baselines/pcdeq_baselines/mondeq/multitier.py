"""Multi-tier monDEQ: states at several resolutions coupled by stride-2 convolutions.

The operator and its resolvent, a block back-substitution over the tiers whose diagonal
blocks are inverted in the Fourier domain with a Woodbury identity (the stride-2 Gram
terms fold four aliased frequencies into one). See :class:`MonMultiTierOperator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fft import (
    circular_conv,
    circular_conv_transpose,
    conv_transfer,
    fold_aliases,
    from_frequency,
    strided_conv,
    strided_conv_transpose,
    tiled_product,
    to_frequency,
)
from .ops import MonotoneOperator, Resolvent, State, border_mask, eye_like, hermitian, unit

__all__ = ["MonMultiTierOperator"]

#: Smallest gain kept by :meth:`MonMultiTierOperator.project` (the kernels use sqrt(g)).
_MIN_TIER_GAIN = 1e-6


class _MultiTierResolvent(Resolvent):
    """Block back-substitution over the tiers; Woodbury for the strided Gram terms.

    ``I + alpha (I - W)`` is block lower-bidiagonal: tier ``i``'s diagonal block is
    ``D_i = E_i + alpha An_i^T An_i`` with ``E_i`` diagonal in the DFT of tier ``i`` and
    ``An_i`` the stride-2 convolution into tier ``i + 1``; the block below it is
    ``2 alpha A_{i+1}^T P An_i`` (``P`` embeds the ``h/2 x w/2`` output into the next
    tier). Sampling at even pixels folds four aliased frequencies into one, so with
    ``An_i = S C_i``,

        D_i^-1 = E_i^-1 - E_i^-1 C_i^T S^T H_i S C_i E_i^-1,
        H_i = (I / alpha + S C_i E_i^-1 C_i^T S^T)^-1,

    where ``H_i`` is one ``C_{i+1} x C_{i+1}`` inverse per *coarse* frequency.
    """

    def __init__(self, op: MonMultiTierOperator, alpha: float) -> None:
        self.op = op
        self.alpha = alpha
        self.e_inv: list[torch.Tensor] = []
        self.c: list[torch.Tensor] = []
        self.c_h: list[torch.Tensor] = []
        self.h: list[torch.Tensor] = []
        self._transposed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        for i in range(op.num_tiers):
            a, b = op.tier_kernel(i), op.skew_kernel(i)
            ta, tb = conv_transfer(a, op.sizes[i]), conv_transfer(b, op.sizes[i])
            eye = eye_like(ta.shape[-1], ta)
            e = (1 + alpha * op.m) * eye + alpha * (hermitian(ta) @ ta - tb + hermitian(tb))
            e_inv = torch.linalg.inv(e)
            self.e_inv.append(e_inv)
            if i + 1 < op.num_tiers:
                c = conv_transfer(op.down_kernel(i), op.sizes[i])  # [h, w, C_{i+1}, C_i]
                gram = fold_aliases(c @ e_inv @ hermitian(c))
                eye_c = eye_like(gram.shape[-1], gram)
                self.c.append(c)
                self.c_h.append(hermitian(c))
                self.h.append(torch.linalg.inv(eye_c / alpha + gram))

    def _diagonal_solve(self, i: int, r: torch.Tensor, transpose: bool) -> torch.Tensor:
        if transpose:
            if self._transposed is None:  # D^-T uses the conjugate transposes
                self._transposed = (
                    [hermitian(e) for e in self.e_inv],
                    [hermitian(h) for h in self.h],
                )
            e_inv, h = self._transposed[0][i], self._transposed[1][i] if i < len(self.h) else None
        else:
            e_inv, h = self.e_inv[i], self.h[i] if i < len(self.h) else None
        u = e_inv @ to_frequency(r)
        if h is not None:
            coarse = h @ fold_aliases(self.c[i] @ u)
            u = u - e_inv @ tiled_product(self.c_h[i], coarse)
        return from_frequency(u)

    def apply(self, r: State) -> State:
        op, out = self.op, []
        for i in range(op.num_tiers):
            rhs = r[i]
            if i > 0:
                rhs = rhs - 2 * self.alpha * op.cross_term(i, out[i - 1])
            out.append(self._diagonal_solve(i, rhs, transpose=False))
        return tuple(out)

    def apply_transpose(self, r: State) -> State:
        op = self.op
        out: list[torch.Tensor] = [r[0]] * op.num_tiers
        for i in reversed(range(op.num_tiers)):
            rhs = r[i]
            if i + 1 < op.num_tiers:
                rhs = rhs - 2 * self.alpha * op.cross_term_transpose(i, out[i + 1])
            out[i] = self._diagonal_solve(i, rhs, transpose=True)
        return tuple(out)


class MonMultiTierOperator(MonotoneOperator):
    """Multi-tier monDEQ: states at several resolutions coupled by stride-2 convolutions.

    With ``R`` the block lower-bidiagonal operator whose diagonal blocks are the tier
    convolutions ``A_i`` and whose sub-diagonal blocks are ``P An_i`` (stride-2
    convolutions embedded into the next tier), the model uses

        I - W = m I + blockdiag(R^T R) + 2 lower(R^T R) - (B - B^T),

    i.e. ``R^T R`` with its upper block moved below the diagonal. The moved part is
    skew-symmetric relative to the symmetric Gram matrix, so the symmetric part of
    ``I - W`` is still ``m I + R^T R`` (strongly monotone), while ``I - W`` is block lower
    triangular, which makes ``(I + alpha (I - W))^-1`` a block back-substitution.

    Args:
        in_channels: Input channels.
        channels: Channels per tier, finest first, e.g. ``(16, 32, 60)``.
        size: Size of the finest state: the input plus the two border pixels; each next
            tier has half the interior plus its own border (``34 -> 18 -> 10``).
        m: Monotonicity parameter.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        size: tuple[int, int],
        m: float = 1.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(m)
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"a multi-tier model needs at least 2 tiers, got channels={channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        sizes = [(int(size[0]), int(size[1]))]
        for _ in channels[1:]:
            h, w = sizes[-1]
            if h % 2 or w % 2 or min(h, w) < 4:
                raise ValueError(
                    f"multi-tier sizes must stay even and >= 4 down to the last tier; got tier "
                    f"sizes {sizes} for channels {channels} (input must be padded to an even size)"
                )
            sizes.append((h // 2 + 1, w // 2 + 1))
        self.sizes = sizes
        self.num_tiers = len(channels)
        k = kernel_size
        self.U = nn.Conv2d(in_channels, channels[0], k)
        self.A = nn.ModuleList([nn.Conv2d(c, c, k, bias=False) for c in channels])
        self.B = nn.ModuleList([nn.Conv2d(c, c, k, bias=False) for c in channels])
        self.down = nn.ModuleList(
            [nn.Conv2d(c0, c1, k, stride=2, bias=False) for c0, c1 in zip(channels, channels[1:])]
        )
        self.g = nn.Parameter(torch.ones(self.num_tiers))
        self.g_down = nn.Parameter(torch.ones(self.num_tiers - 1))
        self.h = nn.Parameter(torch.ones(self.num_tiers))

    # kernels of the weight-normalised parametrisation
    def tier_kernel(self, i: int) -> torch.Tensor:
        return torch.sqrt(self.g[i]) * unit(self.A[i].weight)

    def down_kernel(self, i: int) -> torch.Tensor:
        return torch.sqrt(self.g_down[i]) * unit(self.down[i].weight)

    def skew_kernel(self, i: int) -> torch.Tensor:
        return self.h[i] * unit(self.B[i].weight)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(batch, a.in_channels, *s) for a, s in zip(self.A, self.sizes)]

    def interior_masks(self, like: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return tuple(border_mask(s, like=like) for s in self.sizes)

    def injection(self, x: torch.Tensor) -> State:
        padded = F.pad(x, (1, 1, 1, 1))
        first = circular_conv(padded, self.U.weight) + self.U.bias.view(1, -1, 1, 1)
        rest = tuple(first.new_zeros(s) for s in self.state_shapes(x.shape[0])[1:])
        return (first, *rest)

    def _embed(self, y: torch.Tensor) -> torch.Tensor:  # P: h/2 x w/2 -> next tier
        return F.pad(y, (0, 1, 0, 1))

    def cross_term(self, i: int, z_prev: torch.Tensor) -> torch.Tensor:
        """``A_i^T P An_{i-1} z_{i-1}``: tier ``i - 1`` -> tier ``i``."""
        a = self.tier_kernel(i)
        return circular_conv_transpose(
            self._embed(strided_conv(z_prev, self.down_kernel(i - 1))), a
        )

    def cross_term_transpose(self, i: int, z_next: torch.Tensor) -> torch.Tensor:
        """``An_i^T P^T A_{i+1} z_{i+1}``: tier ``i + 1`` -> tier ``i``."""
        h, w = self.sizes[i]
        a_z = circular_conv(z_next, self.tier_kernel(i + 1))[..., : h // 2, : w // 2]
        return strided_conv_transpose(a_z, self.down_kernel(i))

    def _identity_minus_w(self, z: State, transpose: bool) -> State:
        out = []
        for i, v in enumerate(z):
            a, b = self.tier_kernel(i), self.skew_kernel(i)
            term = self.m * v + circular_conv_transpose(circular_conv(v, a), a)
            skew = circular_conv(v, b) - circular_conv_transpose(v, b)
            term = term + skew if transpose else term - skew
            if i + 1 < self.num_tiers:
                d = self.down_kernel(i)
                term = term + strided_conv_transpose(strided_conv(v, d), d)
                if transpose:
                    term = term + 2 * self.cross_term_transpose(i, z[i + 1])
            if i > 0 and not transpose:
                term = term + 2 * self.cross_term(i, z[i - 1])
            out.append(term)
        return tuple(out)

    def multiply(self, z: State) -> State:
        return tuple(v - t for v, t in zip(z, self._identity_minus_w(z, transpose=False)))

    def multiply_transpose(self, z: State) -> State:
        return tuple(v - t for v, t in zip(z, self._identity_minus_w(z, transpose=True)))

    def resolvent(self, alpha: float) -> Resolvent:
        return _MultiTierResolvent(self, alpha)

    def project(self) -> None:
        with torch.no_grad():
            self.g.clamp_(min=_MIN_TIER_GAIN)
            self.g_down.clamp_(min=_MIN_TIER_GAIN)
