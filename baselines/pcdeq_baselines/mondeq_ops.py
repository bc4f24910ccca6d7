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
and ``V`` costs one ``C x C`` inverse per spatial frequency (:mod:`.mondeq_fft`). To keep
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

from .mondeq_fft import (
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

__all__ = [
    "MonFcOperator",
    "MonMultiTierOperator",
    "MonSingleConvOperator",
    "MonotoneOperator",
    "State",
    "border_mask",
]

State = tuple[torch.Tensor, ...]

#: Smallest multi-tier gain kept by :meth:`MonMultiTierOperator.project` (sqrt(g) is used).
_MIN_TIER_GAIN = 1e-6


def border_mask(size: tuple[int, int], *, like: torch.Tensor) -> torch.Tensor:
    """``[1, 1, h, w]`` mask: 1 inside, 0 on the one-pixel border."""
    mask = like.new_zeros(1, 1, *size)
    mask[..., 1:-1, 1:-1] = 1
    return mask


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _unit(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm()


def _hermitian(t: torch.Tensor) -> torch.Tensor:
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
        return (1 - self.m) * _eye(a.shape[0], a) - a.T @ a + b - b.T

    def resolvent(self, alpha: float) -> Resolvent:
        a, b = self.A.weight, self.B.weight
        eye = _eye(a.shape[0], a)
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
            self._inverse_h = _hermitian(self.inverse)
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
        return _unit(self.A.weight), self.h * _unit(self.B.weight)

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
        half = self.size[1] // 2 + 1
        ta = conv_transfer(a, self.size)[:, :half]
        tb = conv_transfer(b, self.size)[:, :half]
        eye = _eye(ta.shape[-1], ta)
        system = (1 + alpha * self.m) * eye + alpha * (
            self.g * _hermitian(ta) @ ta - tb + _hermitian(tb)
        )
        return _FourierResolvent(torch.linalg.inv(system), self.size)

    def project(self) -> None:
        with torch.no_grad():
            self.g.clamp_(min=0.0)


# -- multi-tier ---------------------------------------------------------------------------


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
            eye = _eye(ta.shape[-1], ta)
            e = (1 + alpha * op.m) * eye + alpha * (_hermitian(ta) @ ta - tb + _hermitian(tb))
            e_inv = torch.linalg.inv(e)
            self.e_inv.append(e_inv)
            if i + 1 < op.num_tiers:
                c = conv_transfer(op.down_kernel(i), op.sizes[i])  # [h, w, C_{i+1}, C_i]
                gram = fold_aliases(c @ e_inv @ _hermitian(c))
                eye_c = _eye(gram.shape[-1], gram)
                self.c.append(c)
                self.c_h.append(_hermitian(c))
                self.h.append(torch.linalg.inv(eye_c / alpha + gram))

    def _diagonal_solve(self, i: int, r: torch.Tensor, transpose: bool) -> torch.Tensor:
        if transpose:
            if self._transposed is None:  # D^-T uses the conjugate transposes
                self._transposed = (
                    [_hermitian(e) for e in self.e_inv],
                    [_hermitian(h) for h in self.h],
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
        return torch.sqrt(self.g[i]) * _unit(self.A[i].weight)

    def down_kernel(self, i: int) -> torch.Tensor:
        return torch.sqrt(self.g_down[i]) * _unit(self.down[i].weight)

    def skew_kernel(self, i: int) -> torch.Tensor:
        return self.h[i] * _unit(self.B[i].weight)

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
