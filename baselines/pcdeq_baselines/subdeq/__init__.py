"""SubDEQ: subhomogeneous deep equilibrium models (Sittoni & Tudisco, ICML 2024).

The package's face: the released networks (:mod:`.models`), the SubDEQ layer
(:mod:`.block`) and its subhomogeneity certificate (:mod:`.certificate`). Registered only
through the baselines' entry point.
"""

from .block import (
    NORMALIZED_SHIFT,
    PLAIN_SHIFT,
    SUBDEQ_SOLVER,
    SubDEQBlock,
    SubDEQConvBlock,
    SubDEQLinearBlock,
)
from .certificate import SubhomogeneityCertificate, activation_coefficient
from .models import (
    MODEL_SPECS,
    SubDEQConvNet,
    SubDEQFcNet,
    make_subdeq_conv,
    make_subdeq_conv_normalized,
    make_subdeq_fc,
    make_subdeq_fc_normalized,
)

__all__ = [
    "MODEL_SPECS",
    "NORMALIZED_SHIFT",
    "PLAIN_SHIFT",
    "SUBDEQ_SOLVER",
    "SubDEQBlock",
    "SubDEQConvBlock",
    "SubDEQConvNet",
    "SubDEQFcNet",
    "SubDEQLinearBlock",
    "SubhomogeneityCertificate",
    "activation_coefficient",
    "make_subdeq_conv",
    "make_subdeq_conv_normalized",
    "make_subdeq_fc",
    "make_subdeq_fc_normalized",
]
