"""monDEQ's layer as a registered cell (``mondeq``), on the dense (linear) backbone.

Only dense states fit: monDEQ's convolutional operators carry two border pixels in their
state (circular convolution on the padded image), so their state is not shaped like the
input a conv backbone hands its cell. On the linear backbone the cell is
``z = relu(W z + U u + b)`` with ``W`` monotone-parametrised and the backbone's features
``u`` as the injection.
"""

from __future__ import annotations

from typing import Any

import torch

from pcdeq_plugin.specs import CellSpec

from .block import MonDEQBlock
from .models import _SOLVER_DEFAULTS
from .ops import MonFcOperator

__all__ = ["CELL_SPECS", "MonDEQCell", "mondeq_cell"]


class MonDEQCell(MonDEQBlock):
    """A one-tier :class:`MonDEQBlock` that returns its state as a tensor, not a tuple."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def mondeq_cell(
    state_shape: tuple[int, ...], name: str, *, m: float = 1.0, **solver: Any
) -> MonDEQCell:
    """monDEQ's fully connected layer for a dense state ``(width,)``.

    Args:
        state_shape: ``(width,)``; the injection ``U`` maps the backbone's ``width``
            features to the state.
        name: Block name in the statistics.
        m: Monotonicity parameter.
        **solver: :class:`MonDEQBlock` options (``splitting``, ``tol``, ``max_iter``, ...),
            with the monDEQ models' defaults.
    """
    if len(state_shape) != 1:
        raise ValueError(
            f"the mondeq cell takes dense states (width,) only, got {state_shape}: monDEQ's "
            "convolutional operators carry two border pixels in their state"
        )
    (width,) = state_shape
    return MonDEQCell(MonFcOperator(width, width, m=m), name=name, **{**_SOLVER_DEFAULTS, **solver})


CELL_SPECS: dict[str, CellSpec] = {
    "mondeq": CellSpec(
        name="mondeq",
        factory=mondeq_cell,
        family="mondeq",
        description="monDEQ layer relu(W z + U u + b), monotone W, Peaceman-Rachford (dense)",
        state_kinds=("dense",),
        options=("m", *_SOLVER_DEFAULTS),
    )
}
