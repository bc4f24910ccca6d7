"""Training recipes: every family's published recipe reaches the run on every dataset.

The table below is written from the papers and scripts each recipe cites (not read back
from the code): the harness must apply exactly these values for every registered model on
every registered dataset. A field a recipe does not declare takes the harness default.
"""

from __future__ import annotations

import types

import pytest

from pcdeq_plugin import ModelSpec, hookimpl
from pcdeq_plugin.bench.config import TrainConfig, defaults
from pcdeq_plugin.bench.datasets import dataset_info
from pcdeq_plugin.bench.resolve import resolve_config, training_recipe
from pcdeq_plugin.checks import ArgumentError
from pcdeq_plugin.plugins import PluginError, add_plugin, reset_plugins
from pcdeq_plugin.recipes import RecipeOverride, TrainingRecipe
from pcdeq_plugin.registry import MODELS, list_datasets, list_models

APPLIED = ("optimizer", "lr", "weight_decay", "batch_size", "epochs", "milestone", "gamma")

# pcDEQ README commands: AdamW, lr 5e-4, batch 64, one decay x0.1; MNIST's is the default
_PCDEQ_MNIST = {"optimizer": "adamw", "lr": 5e-4, "batch_size": 64, "gamma": 0.1}
_PCDEQ_MNIST.update(weight_decay=1.5e-2, epochs=40, milestone=30)
_PCDEQ = {
    "default": _PCDEQ_MNIST,
    "svhn": {**_PCDEQ_MNIST, "weight_decay": 2e-2, "epochs": 80, "milestone": 70},
    "cifar10": {**_PCDEQ_MNIST, "weight_decay": 2e-2, "epochs": 120, "milestone": 100},
}
# monDEQ appendix E: Adam 1e-3, no decay, batch 128, 40 epochs, x0.1 after 10 (25 for the
# single conv on SVHN/CIFAR-10); multi-tier on CIFAR-10 at lr 1e-2
_MONDEQ = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 128}
_MONDEQ.update(epochs=40, milestone=10, gamma=0.1)
# LBEN scripts: Adam 1e-3, batch 128; FC 30 epochs decay at 10; conv 25 epochs decay at 15
_LBEN_FC = {**_MONDEQ, "epochs": 30, "milestone": 10}
# GEQ (our recipe, monDEQ-style): Adam 1e-3, batch 128, 40 epochs, decay at 30
_GEQ = {**_MONDEQ, "milestone": 30}
# SubDEQ train.py: Adam 1e-3, weight decay 1e-5, batch 128, 30 (FC) or 40 (conv) epochs
_SUBDEQ_FC = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 128}
_SUBDEQ_FC["epochs"] = 30
# ANODE config_img.json: Adam 1e-3, batch 256, 20 epochs
_ODE = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 256, "epochs": 20}

PUBLISHED: dict[str, dict[str, dict[str, object]]] = {
    **{
        f"pcdeq-{arch}-{v}": _PCDEQ
        for arch in ("linear", "single-conv", "multi-conv")
        for v in (1, 2)
    },
    # the backbones by name (any cell; the pcDEQ cell by default) and the unconstrained
    # DEQ train with the pcDEQ recipe unchanged: only the cell differs
    **{arch: _PCDEQ for arch in ("linear", "single-conv", "multi-conv")},
    **{f"deq-{arch}": _PCDEQ for arch in ("linear", "single-conv", "multi-conv")},
    "mondeq-fc": {"default": _MONDEQ},
    "mondeq-single-conv": {
        "default": _MONDEQ,
        "svhn": {**_MONDEQ, "milestone": 25},
        "cifar10": {**_MONDEQ, "milestone": 25},
    },
    "mondeq-multi-tier": {"default": _MONDEQ, "cifar10": {**_MONDEQ, "lr": 1e-2}},
    "lben-fc": {"default": _LBEN_FC},
    "lben-conv": {"default": {**_LBEN_FC, "epochs": 25, "milestone": 15}},
    "geq-fc": {"default": _GEQ},
    "geq-conv": {"default": _GEQ},
    "subdeq-fc": {"default": _SUBDEQ_FC},
    "subdeq-fc-normalized": {"default": _SUBDEQ_FC},
    "subdeq-conv": {"default": {**_SUBDEQ_FC, "epochs": 40}},
    "subdeq-conv-normalized": {"default": {**_SUBDEQ_FC, "epochs": 40}},
    "node": {"default": _ODE},
    "anode": {"default": _ODE},
}


def _datasets() -> list[str]:
    dataset_info("mnist5k")  # the harness's datasets are registered
    return list_datasets()


DATASETS = _datasets()
MODEL_NAMES = list_models()


def published(model: str, dataset: str) -> dict[str, object]:
    table = PUBLISHED[model]
    return dict(table.get(dataset, table["default"]))


def test_every_registered_model_and_dataset_is_covered() -> None:
    assert {"mnist", "mnist5k", "svhn", "cifar10", "cifar10-aug"} <= set(DATASETS)
    missing = sorted(set(MODEL_NAMES) - set(PUBLISHED))
    assert not missing, f"no published recipe in this test for {missing}; add it to PUBLISHED"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_the_published_recipe_reaches_the_run(model: str, dataset: str) -> None:
    expected = published(model, dataset)
    assert training_recipe(MODELS.get(model).training, dataset) == expected
    config, _ = resolve_config({"model": model, "dataset": dataset})
    harness = defaults()
    applied = {key: getattr(config, key) for key in APPLIED}
    assert applied == {key: expected.get(key, harness[key]) for key in APPLIED}


def test_a_caller_epoch_count_drops_the_recipe_milestone_only() -> None:
    config, _ = resolve_config({"model": "deq-single-conv", "dataset": "svhn", "epochs": 8})
    assert (config.epochs, config.milestone, config.effective_milestone) == (8, None, 6)
    assert config.weight_decay == 2e-2  # the rest of the SVHN recipe still applies


def test_mapping_form_is_converted_and_overrides_win_field_by_field() -> None:
    recipe = TrainingRecipe.from_mapping(
        {
            "lr": 1e-3,
            "epochs": 40,
            "milestone": 30,
            "notes": {"runs": 3},
            "per_dataset": {"svhn": {"epochs": 80, "milestones": [70], "notes": {"runs": 1}}},
        }
    )
    assert recipe.per_dataset["svhn"] == RecipeOverride(
        epochs=80, milestones=(70,), notes={"runs": 1}
    )
    assert recipe.for_dataset("svhn").notes == {"runs": 1}
    assert recipe.harness_options("svhn") == {"lr": 1e-3, "epochs": 80, "milestone": 70}
    assert recipe.harness_options("mnist") == {"lr": 1e-3, "epochs": 40, "milestone": 30}
    assert TrainingRecipe(milestones=()).harness_options() == {"milestone": 0}  # no decay
    assert recipe["lr"] == 1e-3 and recipe.get("gamma", 0.5) == 0.5  # read like a mapping
    with pytest.raises(KeyError):
        recipe["gamma"]  # undeclared
    spec = ModelSpec("m", lambda *a, **k: None, "fam", training={"lr": 2e-3})
    assert spec.training == TrainingRecipe(lr=2e-3)


MALFORMED = [
    ({"lr": -1e-3}, "model 'bad' training recipe: lr must be a positive finite number, got -0.001"),
    ({"epochs": True}, "training recipe: epochs must be an integer >= 1, got True"),
    ({"optimizer": "lamb"}, "unknown optimizer 'lamb'"),
    ({"gamma": 2.0}, "gamma must be a number in (0, 1], got 2.0"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
    ({"milestones": [10, 20]}, "milestones has 2 epochs [10, 20]; the harness applies one"),
    ({"milestone": 10, "milestones": [10]}, "give milestone or milestones, not both"),
    # the unconstrained DEQ's old format: a dataset table outside per_dataset
    (
        {"lr": 5e-4, "svhn": {"epochs": 80}},
        "unknown field(s) ['svhn'] (per-dataset values go under per_dataset",
    ),
    ({"weight_decy": 0.0}, "unknown field(s) ['weight_decy']"),
    (
        {"per_dataset": {"svhn": {"epochs": 0}}},
        "per_dataset['svhn'].epochs must be an integer >= 1, got 0",
    ),
    (
        {"per_dataset": {"svhn": {"source": "x"}}},
        "per_dataset['svhn']: unknown field(s) ['source']",
    ),
    ({"per_dataset": [("svhn", {})]}, "per_dataset must be a mapping"),
    ({"notes": ["runs"]}, "notes must be a mapping with string keys"),
]


@pytest.mark.parametrize(("training", "message"), MALFORMED)
def test_a_recipe_the_harness_cannot_read_is_refused_with_the_model_named(
    training, message
) -> None:
    with pytest.raises(ArgumentError) as caught:
        ModelSpec("bad", lambda *a, **k: None, "fam", training=training)
    assert message in str(caught.value)
    assert str(caught.value).startswith("model 'bad' training recipe")


def test_typed_recipes_are_checked_too() -> None:
    with pytest.raises(ArgumentError, match=r"per_dataset\['svhn'\] must be a RecipeOverride"):
        TrainingRecipe(per_dataset={"svhn": TrainingRecipe()})
    with pytest.raises(ArgumentError, match="batch_size must be an integer >= 1, got 0"):
        RecipeOverride(batch_size=0)
    with pytest.raises(TypeError, match="training must be a TrainingRecipe or a mapping"):
        ModelSpec("bad", lambda *a, **k: None, "fam", training=[("lr", 1.0)])


def test_a_plugin_with_a_malformed_recipe_is_refused_at_registration() -> None:
    @hookimpl
    def pcdeq_register_models():
        spec = ModelSpec("recipe-typo", lambda *a, **k: None, "fam", training={"lr ": 1e-3})
        return {spec.name: spec}

    plugin = types.SimpleNamespace(pcdeq_register_models=pcdeq_register_models)
    try:
        with pytest.raises(
            PluginError, match=r"model 'recipe-typo' training recipe: unknown field"
        ):
            add_plugin(plugin, "recipe_typo_plugin", strict=True)
        assert "recipe-typo" not in MODELS
    finally:
        reset_plugins()


def test_harness_default_milestone_is_used_where_a_recipe_has_none() -> None:
    config, _ = resolve_config({"model": "subdeq-fc", "dataset": "mnist"})
    assert config.milestone is None
    assert config.effective_milestone == TrainConfig(epochs=30).effective_milestone
