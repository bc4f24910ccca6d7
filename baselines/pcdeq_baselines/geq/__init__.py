"""GEQ: Gaussian-kernel-inspired equilibrium models (Li, Wang & Lin, NeurIPS 2023).

No code was released. What the paper determines: an optimisation-induced equilibrium model
(OptEq) whose linear kernel between the input features and the transformed state is
replaced by a Gaussian kernel ``exp(-gamma ||x - W z||^2)`` over patches, weight
normalisation, Anderson acceleration forward. What we had to choose (the paper text
available to us did not fix it, so these are ours):

* the hidden objective and hence the layer ``z = relu(W^T k(U x + b - W z))``,
  ``k(v)_p = exp(-c ||v_p||^2) v_p`` (:mod:`.block`), a patch being the whole vector (fc)
  or one pixel's channels (conv), ``c = kernel_gamma / channels``;
* ``kernel_gamma`` is a fixed option (default 1.0) instead of the paper's data-dependent
  ``0.2 / M`` (``M`` the smallest squared patch distance);
* ``||W|| < 1`` by a bounded weight-norm gain, which makes the map a contraction (the
  uniqueness and stability the paper claims, certified here for every parameter value);
* one branch, no multi-scale parallel branches (MOptEqs); a linear read-out after average
  pooling, as in the other baselines;
* implicit (adjoint) gradients instead of the paper's phantom gradients;
* sizes: the paper has no MNIST/SVHN models, so the presets match the comparison's
  parameter budgets (84K on MNIST, 172K on SVHN/CIFAR-10).

========================  ===============================  ===========
name                      preset                           parameters
========================  ===============================  ===========
``geq-fc``                ``mnist``: 95 units              84,561
``geq-conv``              ``mnist``: 73 ch., pool 4         84,472
``geq-conv``              ``svhn``/``cifar10``: 106 ch.     171,943
========================  ===============================  ===========
"""

from .block import GEQ_SOLVER, KERNELS, GEQBlock, GEQConvBlock, GEQLinearBlock
from .models import MODEL_SPECS, GEQConvNet, GEQFcNet, make_geq_conv, make_geq_fc

__all__ = [
    "GEQ_SOLVER",
    "KERNELS",
    "MODEL_SPECS",
    "GEQBlock",
    "GEQConvBlock",
    "GEQConvNet",
    "GEQFcNet",
    "GEQLinearBlock",
    "make_geq_conv",
    "make_geq_fc",
]
