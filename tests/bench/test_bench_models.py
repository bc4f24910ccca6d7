"""Every registered model (built-ins and plugins) goes through the harness."""

from __future__ import annotations

import pytest
import torch

from pcdeq_plugin import list_models
from pcdeq_plugin.bench import run
from pcdeq_plugin.bench.config import TrainConfig
from pcdeq_plugin.bench.resolve import resolve_config
from pcdeq_plugin.plugins import reset_plugins

MODELS = list_models()
reset_plugins()  # collection loaded the plugins; leave the process as fresh as we found it


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
    from pcdeq_plugin import build_model

    assert summary["status"] == "ok"
    built = build_model(model, (1, 28, 28), 10, preset="small")
    assert summary["params"] == sum(p.numel() for p in built.parameters())  # exactly this size
    assert (
        summary["fwd_iters"] is not None and summary["fwd_iters"] >= 1
    )  # stats reached the harness
    assert summary["unit"] in {"iter", "nfe"}


# one model per family: resume must be exact with BatchNorm, projections, ODE solvers, ...
RESUME_MODELS = [
    m
    for m in (
        "pcdeq-linear-1",
        "pcdeq-single-conv-2",
        "mondeq-fc",
        "node",
        "deq-linear",
        "subdeq-fc",
    )
    if m in MODELS
]


@pytest.mark.slow
@pytest.mark.parametrize("model", RESUME_MODELS)
def test_resume_is_exact_for_real_models(model: str, tmp_path) -> None:
    from pcdeq_plugin.bench.checkpoint import load_checkpoint

    config = {
        "model": model, "preset": "small", "epochs": 2, "batch_size": 16, "train_limit": 48,
        "test_limit": 16, "device": "cpu", "progress": False,
    }  # fmt: skip
    run({**config, "out_dir": str(tmp_path / "a")})

    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run({**config, "out_dir": str(tmp_path / "b")}, on_batch=interrupt)
    run({"out_dir": str(tmp_path / "b"), "resume": True})
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched
