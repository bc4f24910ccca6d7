"""Shared pieces of the TorchDEQ bridge: the guarded import, names, the lock, the mark."""

from __future__ import annotations

import threading
from typing import Any

STOP_MODES: tuple[str, ...] = ("abs", "rel")
DEFAULT_SOLVER_NAME = "pcdeq"
DEFAULT_NORM_NAME = "pc_nonneg"

# TorchDEQ 0.1.0's own entries: never replaced, whatever ``overwrite`` says.
TORCHDEQ_BUILTINS: dict[str, frozenset[str]] = {
    "solver": frozenset({"anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"}),
    "norm": frozenset({"weight_norm", "spectral_norm", "none"}),
    "core": frozenset({"sliced", "indexing"}),
}
# forward solvers whose extrapolation can leave the nonnegative orthant
ORTHANT_LEAVING = frozenset({"anderson", "broyden"})

# Objects carrying this attribute were registered by this bridge (also across a reload).
BRIDGE_MARK = "__pcdeq_bridge__"
# Guards registration and the lazily built core class.
LOCK = threading.RLock()


def import_torchdeq() -> Any:
    """Import TorchDEQ, or explain how to get it."""
    try:
        import torchdeq
        import torchdeq.core
        import torchdeq.norm.base_norm
        import torchdeq.solver
        import torchdeq.solver.stat
    except ImportError as exc:
        raise ImportError(
            "the TorchDEQ bridge needs the 'torchdeq' package (version 0.1.0), which could not "
            f"be imported ({exc}); install it with: pip install 'torchdeq==0.1.0'"
        ) from exc
    return torchdeq
