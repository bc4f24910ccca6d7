"""pcdeq-bench: the shared training harness (data, loop, checkpoints, reports, CLI).

The library never imports this package; it imports the library. Public entry points::

    from pcdeq_plugin.bench import run, compare, write_report, evaluate_checkpoint

``run(config: dict) -> dict`` is what sweep engines (Ray Tune, Optuna) call.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run": "session",
    "resolve_config": "resolve",
    "compare": "compare",
    "write_report": "report",
    "evaluate_checkpoint": "evaluate",
    "load_dataset": "datasets",
    "TrainConfig": "config",
    "ConfigError": "config",
    "CheckpointError": "checkpoint",
    "DatasetNotFoundError": "datasets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pcdeq_plugin.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
