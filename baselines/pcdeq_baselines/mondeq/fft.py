"""Circular convolutions and their Fourier-domain form, for monDEQ's convolutional inverses.

A circular ("periodic") convolution of a ``C_in``-channel ``h x w`` image is block-diagonal
in the 2-D discrete Fourier basis: at every spatial frequency ``k`` it multiplies the
``C_in``-vector of Fourier coefficients by one ``C_out x C_in`` complex matrix, the
*transfer matrix* ``T(k)``. Sums, products, transposes (``T(k)^H``) and inverses of such
operators are therefore per-frequency matrix operations, which is how monDEQ applies
``(I + alpha (I - W))^-1`` exactly at the cost of ``h w`` small inverses.

Conventions: ``torch.fft.fft2`` (unnormalised forward transform) over the last two
dimensions; transfer tensors are laid out frequency-major, ``[h, w, C_out, C_in]``, so
applying one is a batched matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "circular_conv",
    "circular_conv_transpose",
    "conv_transfer",
    "fold_aliases",
    "from_frequency",
    "strided_conv",
    "strided_conv_transpose",
    "tile_aliases",
    "tiled_product",
    "to_frequency",
]


def _circular_pad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ph, pw = weight.shape[-2] // 2, weight.shape[-1] // 2
    return F.pad(x, (pw, pw, ph, ph), mode="circular")


def circular_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Cross-correlation with periodic boundary (odd kernel, centred): ``[B, C_in, h, w]``."""
    return F.conv2d(_circular_pad(x, weight), weight, stride=stride)


def circular_conv_transpose(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`circular_conv` (stride 1): correlation with the flipped,
    channel-transposed kernel."""
    flipped = weight.transpose(0, 1).flip(-2, -1)
    return F.conv2d(_circular_pad(y, flipped), flipped)


def strided_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Stride-2 circular convolution: :func:`circular_conv` sampled at even pixels.

    Maps an ``h x w`` image (``h``, ``w`` even) to ``h/2 x w/2``.
    """
    return circular_conv(x, weight, stride=2)


def strided_conv_transpose(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`strided_conv`: zero-insertion upsampling, then the adjoint conv."""
    b, c, h, w = y.shape
    up = y.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = y
    return circular_conv_transpose(up, weight)


def conv_transfer(
    weight: torch.Tensor, size: tuple[int, int], *, half: bool = False
) -> torch.Tensor:
    """Transfer matrices of :func:`circular_conv` with ``weight`` on ``size`` images.

    The circular cross-correlation ``y[p] = sum_u w[u] x[p + u - r]`` (``r`` the kernel
    radius) is the circular convolution with the impulse response ``g[t] = w[r - t]``,
    i.e. the flipped kernel rolled so that its centre sits at pixel ``(0, 0)``.

    Args:
        weight: Kernel ``[C_out, C_in, k, k]`` (odd ``k``).
        size: Image size ``(h, w)``.
        half: Only the frequencies ``torch.fft.rfft2`` keeps (``w // 2 + 1`` columns).

    Returns:
        Complex tensor ``[h, w, C_out, C_in]`` (``[h, w // 2 + 1, ...]`` when ``half``).
    """
    h, w = size
    kh, kw = weight.shape[-2:]
    if kh > h or kw > w:
        raise ValueError(f"kernel {kh}x{kw} is larger than the image {h}x{w}")
    impulse = F.pad(weight.flip(-2, -1), (0, w - kw, 0, h - kh))
    impulse = torch.roll(impulse, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    # contiguous: batched matmuls over strided batches copy every matrix separately
    spectrum = torch.fft.rfft2(impulse) if half else torch.fft.fft2(impulse)
    return spectrum.permute(2, 3, 0, 1).contiguous()


def to_frequency(x: torch.Tensor) -> torch.Tensor:
    """Fourier coefficients of ``x [B, C, h, w]``, frequency-major: ``[h, w, C, B]``."""
    return torch.fft.fft2(x).permute(2, 3, 1, 0).contiguous()


def from_frequency(x_hat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_frequency` for a real image: ``[h, w, C, B] -> [B, C, h, w]``."""
    return torch.fft.ifft2(x_hat.permute(3, 2, 0, 1)).real


def fold_aliases(x_hat: torch.Tensor) -> torch.Tensor:
    """Fourier form of sampling at even pixels, frequency-major ``[h, w, ...] -> [h/2, w/2, ...]``.

    With the unnormalised DFT, the coefficient of the subsampled image at frequency ``q``
    is the mean of the four fine-grid coefficients ``q + (a h/2, b w/2)``, ``a, b in {0, 1}``.
    """
    h, w = x_hat.shape[0] // 2, x_hat.shape[1] // 2
    # four slice additions: a strided mean over the alias axes is ~50x slower on CPU
    return (x_hat[:h, :w] + x_hat[h:, :w] + x_hat[:h, w:] + x_hat[h:, w:]) * 0.25


def tile_aliases(y_hat: torch.Tensor) -> torch.Tensor:
    """Fourier form of zero-insertion upsampling (the adjoint of sampling), frequency-major:
    the coarse coefficient at ``q`` is repeated at its four aliases."""
    return y_hat.repeat(2, 2, *([1] * (y_hat.dim() - 2)))


def tiled_product(matrices: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """``matrices @ tile_aliases(y_hat)`` without materialising the tiled copy.

    ``matrices`` is ``[h, w, C_out, C_in]`` on the fine grid, ``y_hat`` ``[h/2, w/2, C_in, B]``.
    """
    h, w, c_out, c_in = matrices.shape
    blocks = matrices.reshape(2, h // 2, 2, w // 2, c_out, c_in)
    return (blocks @ y_hat[None, :, None]).reshape(h, w, c_out, y_hat.shape[-1])
