"""Every registered model (built-ins and plugins) goes through the harness."""

from __future__ import annotations

import pytest

from pcdeq_plugin import list_models
from pcdeq_plugin.bench import run
from pcdeq_plugin.bench.config import TrainConfig
from pcdeq_plugin.bench.resolve import resolve_config

MODELS = list_models()


@pytest.mark.parametrize("model", MODELS)
def test_training_recipe_resolves_to_a_valid_config(model: str) -> None:
    cfg, _ = resolve_config({"model": model})
    assert isinstance(cfg, TrainConfig) and cfg.model == model
    cfg.validate()


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_one_small_epoch_of_every_registered_model(model: str) -> None:
    summary = run({
        "model": model, "preset": "small", "epochs": 1, "batch_size": 32, "train_limit": 64,
        "test_limit": 32, "device": "cpu", "progress": False,
    })  # fmt: skip
    assert summary["status"] == "ok" and summary["params"] > 0
    assert (
        summary["fwd_iters"] is not None and summary["fwd_iters"] >= 1
    )  # stats reached the harness
    assert summary["unit"] in {"iter", "nfe"}
