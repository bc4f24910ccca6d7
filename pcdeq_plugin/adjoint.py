"""The one differentiable step of an implicit solve and where its ``J^T y`` comes from.

:func:`differentiable_step` returns the step ``z = f(z*)`` connected to everything ``f``
closes over, together with the adjoint maps ``y -> J^T y + grad`` the backward solve
iterates (see :mod:`pcdeq_plugin.implicit` for the three sources: analytic, autograd on
the step's own graph, autograd on a graph rebuilt in the hook).
"""

from __future__ import annotations

import torch

from .interface import SolverConfig
from .maps import FixedPointMap, LinearizedStep, MapFn

__all__ = ["differentiable_step"]


def differentiable_step(
    f: MapFn | FixedPointMap,
    z_star: torch.Tensor,
    config: SolverConfig,
    block: str,
) -> LinearizedStep | None:
    """The one differentiable step and its adjoint maps (``None``: nothing to differentiate).

    ``adjoint="auto"`` uses the map's analytic adjoint where it has one, else autograd.
    The autograd adjoint reuses the step's own graph for its vector-Jacobian products
    (``reuse_step_graph=True``: one evaluation per training step instead of two), or
    rebuilds that graph inside the backward hook (the paper's recipe).
    """
    if config.adjoint != "autograd" and isinstance(f, FixedPointMap):
        step = f.linearized_step(z_star)
        if step is not None:
            return step if step.output.requires_grad else None
    if config.adjoint == "analytic":
        raise ValueError(
            f"{block}: adjoint='analytic' needs a map with an analytic Jacobian (pcDEQ cells "
            f"have one); this map is a {type(f).__name__}. Use adjoint='auto' or 'autograd'."
        )
    if not config.reuse_step_graph:
        z = f(z_star)
        if not z.requires_grad:
            return None
        return LinearizedStep(z, lambda grad: _rebuilt_vjp_map(f, z_star, grad))
    z_leaf = z_star.detach().requires_grad_()
    z = f(z_leaf)
    if not _needs_more_than(z, z_leaf):
        return None

    def adjoint(grad: torch.Tensor) -> MapFn:
        def adjoint_map(y: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(z, z_leaf, y, retain_graph=True, allow_unused=True)
            return grad if vjp is None else vjp + grad

        return adjoint_map

    # The caller hooks the returned tensor, and the VJPs need `z` itself: hand out an
    # alias, so that the hook's closure holds `z` but not the tensor it is registered on
    # (a tensor kept alive by its own hook is a cycle the garbage collector cannot see).
    return LinearizedStep(z.view_as(z), adjoint)


def _rebuilt_vjp_map(f: MapFn, z_star: torch.Tensor, grad: torch.Tensor) -> MapFn:
    """``y -> J^T y + grad`` on a graph of ``f`` built now (and dropped after backward)."""
    with torch.enable_grad():
        z_leaf = z_star.detach().requires_grad_()
        f0 = f(z_leaf)
    if not f0.requires_grad:  # f does not depend on its state: J = 0
        return lambda y: grad

    def adjoint_map(y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (vjp,) = torch.autograd.grad(f0, z_leaf, y, retain_graph=True, allow_unused=True)
        return grad if vjp is None else vjp + grad

    return adjoint_map


def _needs_more_than(output: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``output``'s graph reaches a tensor needing a gradient other than ``leaf``.

    Walks back from ``output`` and stops at the first such leaf, so it visits a few nodes of
    the one-evaluation graph, not the network upstream of the injection.
    """
    if output.grad_fn is None:
        return False
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
