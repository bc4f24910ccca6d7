"""Unconstrained DEQ through TorchDEQ: the "no guarantees" reference of the comparison.

The package's face: the networks (:mod:`.models`) and the unconstrained cell with its
TorchDEQ solve (:mod:`.block`). Registered only through the baselines' entry point.
"""

from .block import ACTIVATIONS, RECURRENT_INITS, SOLVERS, UnconstrainedDEQBlock
from .models import (
    MODEL_SPECS,
    UnconstrainedDEQLinear,
    UnconstrainedDEQMultiConv,
    UnconstrainedDEQSingleConv,
    build_deq_linear,
    build_deq_multi_conv,
    build_deq_single_conv,
    deq_cell,
)

__all__ = [
    "ACTIVATIONS",
    "MODEL_SPECS",
    "RECURRENT_INITS",
    "SOLVERS",
    "UnconstrainedDEQBlock",
    "UnconstrainedDEQLinear",
    "UnconstrainedDEQMultiConv",
    "UnconstrainedDEQSingleConv",
    "build_deq_linear",
    "build_deq_multi_conv",
    "build_deq_single_conv",
    "deq_cell",
]
