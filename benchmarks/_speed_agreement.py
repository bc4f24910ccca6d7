"""Do the variants of ``bench_speed.py`` give the reference's answers? (no timing here)

Every variant runs the same test images in evaluation mode under ``torch.no_grad()``, in
batches of the benchmark's batch size, while forward hooks capture each implicit block's
pre-injection and fixed point. Against the ``paper`` variant it reports:

* ``z_rel``: relative difference of the blocks' fixed points, ``||z - z_paper|| /
  ||z_paper||`` over the whole test set, the worst block;
* ``logits_rel``: the same for the logits;
* ``same_pred``: fraction of test images with the same predicted class.

And for every variant, the answer's own quality, recomputed the same way for all (float64
map ``sigma(W z + u)`` at the returned ``z``, the block's own weights):

* ``worst_residual``: the largest per-sample ``||g(z) - z|| / (||g(z)|| + 1e-8)``;
* ``within_tol``: fraction of (sample, block) pairs below the tolerance.
"""

from __future__ import annotations

from typing import Any

import torch
from _paper_reference import paper_injection, paper_map
from _speed_setup import Variant

from pcdeq_plugin import ImplicitModel, PcDEQBlock

__all__ = ["agreement", "capture"]

_EPS = 1e-8  # our per-sample residual's guard (pcdeq_plugin.solvers.RESIDUAL_EPS)


def capture(
    model: ImplicitModel, chunks: list[torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits and each block's ``(pre-injection, fixed point)`` over all chunks (eval, no grad)."""
    blocks = model.implicit_blocks()
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in blocks]

    def hook(index: int):
        def record(module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            seen[index].append((inputs[0].detach().contiguous(), output.detach().contiguous()))

        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x).float() for x in chunks])
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(torch.cat([p for p, _ in s]), torch.cat([z for _, z in s])) for s in seen]
    return logits, pairs


def _residuals(block: PcDEQBlock, pre: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample relative residual of ``z`` for the block's map, in float64."""
    with torch.no_grad():
        u = paper_injection(block, pre.double())
        g = paper_map(block, u, block.weight.detach().double())
        gz = g(z.double())
        diff = (gz - z.double()).flatten(1).norm(dim=1)
        return diff / (gz.flatten(1).norm(dim=1) + _EPS)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def agreement(variants: list[Variant], chunks: list[torch.Tensor], tol: float) -> dict[str, dict]:
    """Per variant name: ``z_rel``, ``logits_rel``, ``same_pred`` (None for the paper),
    ``worst_residual`` and ``within_tol`` (all None for a timing bound)."""
    none = dict.fromkeys(("worst_residual", "within_tol", "z_rel", "logits_rel", "same_pred"))
    variants, bounds = [v for v in variants if not v.is_bound], variants
    out: dict[str, dict] = {v.name: dict(none) for v in bounds if v.is_bound}
    captured = {v.name: capture(v.model, chunks) for v in variants}
    paper = next(v for v in variants if v.is_paper)
    ref_logits, ref_pairs = captured[paper.name]
    for variant in variants:
        logits, pairs = captured[variant.name]
        residuals = torch.cat(
            [
                _residuals(block, pre, z)
                for block, (pre, z) in zip(variant.model.implicit_blocks(), pairs)
            ]
        )
        row: dict[str, Any] = {
            "worst_residual": float(residuals.max()),
            "within_tol": float((residuals < tol).double().mean()),
            "z_rel": None,
            "logits_rel": None,
            "same_pred": None,
        }
        if not variant.is_paper:
            row["z_rel"] = max(_relative(z, zr) for (_, z), (_, zr) in zip(pairs, ref_pairs))
            row["logits_rel"] = _relative(logits, ref_logits)
            same = logits.argmax(dim=1) == ref_logits.argmax(dim=1)
            row["same_pred"] = float(same.double().mean())
        out[variant.name] = row
    return out
