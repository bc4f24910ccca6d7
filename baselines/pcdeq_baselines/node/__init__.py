"""NODE and ANODE: convolutional neural ODEs solved by torchdiffeq (Dupont et al., 2019).

The package's face: the classifiers (:mod:`.models`) and the ODE solve with its statistics
(:mod:`.block`). Registered only through the baselines' entry point.
"""

from .block import ADAPTIVE_METHODS, ODE_METHODS, ODEBlock
from .models import (
    MODEL_SPECS,
    NONLINEARITIES,
    ConvODEFunc,
    NeuralODEClassifier,
    build_anode,
    build_node,
)

__all__ = [
    "ADAPTIVE_METHODS",
    "MODEL_SPECS",
    "NONLINEARITIES",
    "ODE_METHODS",
    "ConvODEFunc",
    "NeuralODEClassifier",
    "ODEBlock",
    "build_anode",
    "build_node",
]
