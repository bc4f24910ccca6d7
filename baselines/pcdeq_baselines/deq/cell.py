"""The unconstrained DEQ cell as a registered cell: ``deq`` on any pcDEQ backbone.

``build_model("single-conv", cell="deq")`` is ``deq-single-conv``: the same backbone, the
same cell (:func:`~.models.deq_cell`), the same options.
"""

from __future__ import annotations

from pcdeq_plugin.specs import CellSpec

from .models import _BLOCK_KEYS, deq_cell

__all__ = ["CELL_SPECS"]

CELL_SPECS: dict[str, CellSpec] = {
    "deq": CellSpec(
        name="deq",
        factory=deq_cell,
        family="deq",
        description="Unconstrained DEQ cell z = act(W z + b + u), TorchDEQ Anderson + IFT",
        options=_BLOCK_KEYS,
    )
}
