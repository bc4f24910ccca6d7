"""Fixtures of the harness tests: the tiny test models as a plugin, small run configs."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY = "bench_tiny_models"


@pytest.fixture(autouse=True)
def clean_plugins() -> Iterator[None]:
    """Forget every plugin added during the test (the harness datasets, the test models, one
    of which always crashes), so nothing leaks into other tests' registries; the next
    lookup reloads built-ins and entry points."""
    yield
    from pcdeq_plugin.plugins import reset_plugins

    reset_plugins()


@pytest.fixture
def tiny_plugin(clean_plugins: None) -> str:
    """Register the tiny test models (``bench-tiny-deq``, ``bench-crash``) and the
    ``bench-blobs`` dataset; returns the module path."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from pcdeq_plugin import add_plugin

    add_plugin(importlib.import_module(TINY), TINY)
    return TINY


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes that must import the tiny test models."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_plugin: str) -> dict:
    """One epoch of the tiny DEQ on 96 mnist5k images (3 batches of 32)."""
    return {
        "model": "bench-tiny-deq",
        "preset": "small",
        "dataset": "mnist5k",
        "epochs": 1,
        "batch_size": 32,
        "train_limit": 96,
        "test_limit": 40,
        "out_dir": str(tmp_path / "run"),
        "plugins": [tiny_plugin],
        "progress": False,
        "device": "cpu",
    }
