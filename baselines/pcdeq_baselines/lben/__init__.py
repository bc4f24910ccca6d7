"""LBEN: Lipschitz bounded equilibrium networks (Revay, Wang & Manchester, 2020).

``z = relu(W z + U x + b)``, ``y = G z + b_y`` with ``W = I - Psi H`` directly parametrised
so that the layer is well posed and ``||y1 - y2|| <= gamma ||x1 - x2||`` (l2, in the model's
input space, i.e. the dataset's normalised pixels) for the model option ``gamma``
(``None``: no bound). Solved and differentiated by monDEQ's splitting code (see
:mod:`.operators` for why the same code applies). Written from the paper and the released
code (``mrevay/LipschitzBoundedEquilibriumModels``, read, not copied).

========================  ===================================  ===========  ==============
name                      preset                               ours         released code
========================  ===================================  ===========  ==============
``lben-fc``               ``mnist``: 80 units                  76,490       76,490
``lben-conv``             ``cifar10``/``svhn``: 81 ch., pool 2  448,104      448,106 (*)
``lben-conv``             ``mnist``: 54 ch., pool 3             155,640      --
========================  ===================================  ===========  ==============

(*) The released ``LBEN_Lip_Conv_V2`` also weight-normalises ``U`` and ``G`` with two
more learned gains; ours keeps ``U`` and ``G`` plain (2 scalars fewer). The paper's text
gives no parameter counts.
"""

from .certificate import LipschitzCertificate
from .models import MODEL_SPECS, LbenConvNet, LbenFcNet, make_lben_conv, make_lben_fc
from .operators import METRICS, LbenConvOperator, LbenFcOperator

__all__ = [
    "METRICS",
    "MODEL_SPECS",
    "LbenConvNet",
    "LbenConvOperator",
    "LbenFcNet",
    "LbenFcOperator",
    "LipschitzCertificate",
    "make_lben_conv",
    "make_lben_fc",
]
