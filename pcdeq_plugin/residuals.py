"""Per-sample relative residuals of a fixed-point iteration.

``||f(z) - z|| / (||f(z)|| + 1e-8)`` over all non-batch dimensions, computed with
reductions that neither copy a channels-last state nor cast a half-precision one.
"""

from __future__ import annotations

import torch

__all__ = [
    "LOW_PRECISION",
    "RESIDUAL_EPS",
    "batch_where",
    "per_sample_residual",
    "residual_norms",
    "stacked_norms",
    "work_buffer",
    "STACK_BELOW",
]

#: Added to the denominator of the relative residual so that a zero image does not divide by 0.
RESIDUAL_EPS = 1e-8


LOW_PRECISION = (torch.float16, torch.bfloat16)


def residual_norms(
    fz: torch.Tensor, z: torch.Tensor, work: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``||f(z) - z||`` and ``||f(z)||`` (float32 for half-precision states).

    Reduces over every non-batch dimension in place, so a channels-last state is not copied.
    A half-precision state is reduced in its own dtype (torch accumulates in float32) and
    only the ``[B]`` results are cast: casting the state first would copy it twice.
    ``work`` (shaped and laid out like ``z``) receives ``f(z) - z``: a solve that checks
    often reuses one buffer instead of allocating a state-sized tensor per check, which on
    the CPU costs page faults comparable to the arithmetic.
    """
    if fz.shape != z.shape:
        raise ValueError(
            f"the map changed the state's shape: got {tuple(fz.shape)} from {tuple(z.shape)}"
        )
    if z.dim() == 0:
        raise ValueError("the state must have a batch dimension, got a 0-d tensor")
    out = torch.float32 if z.dtype in LOW_PRECISION else z.dtype
    if z.dim() == 1:  # one scalar per sample
        return (fz - z).abs().to(out), fz.abs().to(out)
    dims = tuple(range(1, z.dim()))
    delta = fz - z if work is None else torch.sub(fz, z, out=work)
    diff = torch.linalg.vector_norm(delta, dim=dims)
    image = torch.linalg.vector_norm(fz, dim=dims)
    return diff.to(out), image.to(out)


#: Below this many elements the per-sample norms are taken in one reduction over the
#: stacked ``[f(z) - z, f(z)]`` (fewer operations; the copy is negligible).
STACK_BELOW = 1 << 16


def stacked_norms(
    fz: torch.Tensor, z: torch.Tensor, work: torch.Tensor | None = None
) -> torch.Tensor:
    """``[||f(z) - z||, ||f(z)||]`` per sample as one ``[2, B]`` tensor, without a graph.

    ``work``: see :func:`residual_norms` (used for states of :data:`STACK_BELOW` elements
    or more).
    """
    if fz.requires_grad or z.requires_grad:
        fz, z = fz.detach(), z.detach()
    if z.dim() > 1 and z.numel() < STACK_BELOW and fz.shape == z.shape:
        dims = tuple(range(2, z.dim() + 1))
        norms = torch.linalg.vector_norm(torch.stack((fz - z, fz)), dim=dims)
        return norms.float() if z.dtype in LOW_PRECISION else norms
    return torch.stack(residual_norms(fz, z, work))


def work_buffer(z: torch.Tensor) -> torch.Tensor | None:
    """A buffer for :func:`residual_norms` where ``z`` is large enough to need one."""
    return torch.empty_like(z) if z.numel() >= STACK_BELOW else None


def per_sample_residual(
    fz: torch.Tensor, z: torch.Tensor, eps: float = RESIDUAL_EPS
) -> torch.Tensor:
    """Relative residual of each sample: ``||f(z) - z|| / (||f(z)|| + eps)``.

    Args:
        fz: The map's output ``f(z)``, shape ``[B, ...]``.
        z: The iterate, same shape.
        eps: Added to the denominator.

    Returns:
        A ``[B]`` tensor (NaN or Inf where the sample holds non-finite values).
    """
    diff, image = residual_norms(fz, z)
    return diff / (image + eps)


def batch_where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where the per-sample ``mask`` holds, else ``b`` (mask broadcast over non-batch dims)."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
