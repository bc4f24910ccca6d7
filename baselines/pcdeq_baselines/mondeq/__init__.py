"""monDEQ: monotone operator equilibrium networks (Winston & Kolter, NeurIPS 2020).

The package's face: the models (:mod:`.models`), the equilibrium layer (:mod:`.block`), its
linear parts (:mod:`.ops`, :mod:`.multitier`, FFT helpers in :mod:`.fft`) and the splitting
solvers (:mod:`.splitting`). Registered only through the baselines' entry point.
"""

from .block import MonDEQBlock
from .models import (
    MODEL_SPECS,
    MonDEQFcNet,
    MonDEQMultiTierNet,
    MonDEQSingleConvNet,
    make_mondeq_fc,
    make_mondeq_multi_tier,
    make_mondeq_single_conv,
)
from .multitier import MonMultiTierOperator
from .ops import MonFcOperator, MonotoneOperator, MonSingleConvOperator
from .splitting import SPLITTINGS

__all__ = [
    "MODEL_SPECS",
    "SPLITTINGS",
    "MonDEQBlock",
    "MonDEQFcNet",
    "MonDEQMultiTierNet",
    "MonDEQSingleConvNet",
    "MonFcOperator",
    "MonMultiTierOperator",
    "MonSingleConvOperator",
    "MonotoneOperator",
    "make_mondeq_fc",
    "make_mondeq_multi_tier",
    "make_mondeq_single_conv",
]
