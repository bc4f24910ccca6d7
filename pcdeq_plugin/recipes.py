"""Training recipes: what a model's paper trains it with, typed, with per-dataset overrides.

A :class:`TrainingRecipe` holds the values the harness applies (optimizer, learning rate,
weight decay, batch size, epochs, the learning-rate milestone and its factor), where they
come from (``source``), informational ``notes`` the harness shows but never applies (the
paper's full step schedule, its number of runs, ...), and ``per_dataset`` overrides whose
entry for the dataset being trained wins field by field. Every field may be left out
(``None``): the harness default then applies.

The harness applies one MultiStepLR milestone, so ``milestones`` holds at most one epoch
(``()`` means no decay). Everything is checked when the recipe is made, so a recipe the
harness could not read is refused when its model spec is registered, not at epoch 30.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .checks import (
    ArgumentError,
    check_choice,
    check_count,
    check_known_keys,
    check_positive,
    is_finite_number,
)

__all__ = ["HARNESS_KEYS", "OPTIMIZERS", "RecipeOverride", "TrainingRecipe"]

#: The optimizers the harness builds.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")

#: The keys of :meth:`TrainingRecipe.harness_options` (the harness config's names).
HARNESS_KEYS: tuple[str, ...] = (
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "milestone",
    "gamma",
    "optimizer",
)

_MILESTONE_HINT = (
    "the harness applies one MultiStepLR milestone; give the first decay and record the "
    "paper's full schedule in notes (e.g. notes={'lr_step_epochs': 10})"
)


def _check_value(name: str, value: Any, where: str) -> Any:
    """``value`` of field ``name`` checked (and normalised), or ``None`` if not declared.

    ``where`` (e.g. ``"model 'x' training recipe: "``) starts every message.
    """
    if value is None:
        return None
    label = f"{where}{name}"
    if name == "optimizer":
        try:
            return check_choice("optimizer", value, OPTIMIZERS)
        except ArgumentError as exc:
            raise ArgumentError(f"{where}{exc}") from None
    if name == "lr":
        return check_positive(label, value)
    if name == "gamma":
        if not (is_finite_number(value) and 0 < value <= 1):
            raise ArgumentError(f"{label} must be a number in (0, 1], got {value!r}")
        return float(value)
    if name == "weight_decay":
        if not (is_finite_number(value) and value >= 0):
            raise ArgumentError(f"{label} must be a finite number >= 0, got {value!r}")
        return float(value)
    if name in ("batch_size", "epochs"):
        return check_count(label, value)
    if name == "milestones":
        if not isinstance(value, (list, tuple)):
            raise ArgumentError(
                f"{label} must be a list of at most one epoch (an integer >= 1), "
                f"got {value!r}; {_MILESTONE_HINT}"
            )
        if len(value) > 1:
            raise ArgumentError(f"{label} has {len(value)} epochs {list(value)}; {_MILESTONE_HINT}")
        return tuple(check_count(f"{label}[0]", m) for m in value)
    if name == "notes":
        if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
            raise ArgumentError(f"{label} must be a mapping with string keys, got {value!r}")
        return dict(value)
    if name == "source":
        if not isinstance(value, str):
            raise ArgumentError(f"{label} must be a string, got {value!r}")
        return value
    raise AssertionError(f"no check for recipe field {name!r}")  # pragma: no cover


@dataclass(frozen=True)
class RecipeOverride:
    """The fields of a recipe one dataset overrides (``None``: keep the recipe's value).

    Attributes:
        optimizer: One of :data:`OPTIMIZERS`.
        lr: Learning rate, a positive finite number.
        weight_decay: A finite number >= 0.
        batch_size: Training batch size, an integer >= 1.
        epochs: An integer >= 1.
        milestones: The epoch of the one learning-rate decay, as ``(m,)``; ``()`` for none.
        gamma: Learning-rate factor at the milestone, in ``(0, 1]``.
        notes: Shown, never applied (``{"lr_step_epochs": 10, "runs": 3}``).
    """

    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    milestones: tuple[int, ...] | None = None
    gamma: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._normalise("training recipe: ")

    def _normalise(self, where: str) -> None:
        for name in _override_fields():
            value = _check_value(name, getattr(self, name), where)
            object.__setattr__(self, name, {} if name == "notes" and value is None else value)

    def __getitem__(self, key: str) -> Any:
        """Read a declared field by name, as code written for the mapping form does.

        Raises:
            KeyError: ``key`` is no field, or the recipe leaves it undeclared.
        """
        names = {f.name for f in fields(self)}
        value = getattr(self, key) if key in names else None
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """A declared field by name, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def harness_options(self) -> dict[str, Any]:
        """The declared fields under the harness config's names (``milestone``: one int)."""
        options = {
            name: getattr(self, name)
            for name in HARNESS_KEYS
            if name != "milestone" and getattr(self, name) is not None
        }
        if self.milestones is not None:
            options["milestone"] = self.milestones[0] if self.milestones else 0
        return options

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, where: str = "") -> RecipeOverride:
        """An override from ``{"epochs": 80, "milestone": 70, ...}`` (checked, ``where``
        prefixed to every message)."""
        return cls(**_fields_from(mapping, _override_fields(), where))


@dataclass(frozen=True)
class TrainingRecipe(RecipeOverride):
    """A model's training recipe: defaults for every dataset and per-dataset overrides.

    Attributes:
        source: Where the recipe comes from (paper, script, "ours").
        per_dataset: ``{dataset name: RecipeOverride}``; a mapping value is converted.

    Example:
        ``TrainingRecipe(optimizer="adamw", lr=5e-4, epochs=40, milestones=(30,),
        per_dataset={"svhn": RecipeOverride(epochs=80, milestones=(70,))})``
    """

    source: str = ""
    per_dataset: dict[str, RecipeOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._normalise("training recipe: ")
        object.__setattr__(
            self, "source", _check_value("source", self.source, "training recipe: ") or ""
        )
        if not isinstance(self.per_dataset, Mapping):
            raise ArgumentError(
                f"training recipe: per_dataset must be a mapping {{dataset: RecipeOverride}}, "
                f"got {self.per_dataset!r}"
            )
        table: dict[str, RecipeOverride] = {}
        for dataset, override in self.per_dataset.items():
            where = f"training recipe: per_dataset[{dataset!r}]"
            if not (isinstance(dataset, str) and dataset):
                raise ArgumentError(f"{where}: dataset names must be non-empty strings")
            if isinstance(override, Mapping):
                override = RecipeOverride.from_mapping(override, where=f"{where}.")
            if type(override) is not RecipeOverride:  # a nested TrainingRecipe is not one
                raise ArgumentError(
                    f"{where} must be a RecipeOverride or a mapping of its fields, "
                    f"got {type(override).__name__}"
                )
            table[dataset] = override
        object.__setattr__(self, "per_dataset", table)  # each recipe owns its table

    def for_dataset(self, dataset: str) -> RecipeOverride:
        """The recipe on ``dataset``: its override's declared fields win, notes merge."""
        override = self.per_dataset.get(dataset, RecipeOverride())
        merged = {
            name: getattr(override, name)
            if getattr(override, name) is not None
            else getattr(self, name)
            for name in _override_fields()
        }
        merged["notes"] = {**self.notes, **override.notes}
        return RecipeOverride(**merged)

    def harness_options(self, dataset: str | None = None) -> dict[str, Any]:  # type: ignore[override]
        """The declared harness values on ``dataset`` (``None``: the recipe's defaults)."""
        base = self if dataset is None else self.for_dataset(dataset)
        return RecipeOverride.harness_options(base)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, where: str = "") -> TrainingRecipe:  # type: ignore[override]
        """A recipe from the mapping form: ``{"lr": 5e-4, ..., "per_dataset": {...}}``.

        ``milestone: m`` (the harness config's name) is accepted for ``milestones: [m]``.

        Raises:
            ArgumentError: an unknown key (e.g. a dataset table outside ``per_dataset``) or
                a value the harness cannot use; the message starts with ``where``.
        """
        label = f"{where} training recipe: " if where else "training recipe: "
        valid = (*_override_fields(), "source", "per_dataset")
        values = _fields_from(mapping, valid, label)
        table = values.get("per_dataset", {})
        if not isinstance(table, Mapping):
            raise ArgumentError(
                f"{label}per_dataset must be a mapping {{dataset: {{field: value}}}}, got {table!r}"
            )
        values["per_dataset"] = {
            name: RecipeOverride.from_mapping(entry, where=f"{label}per_dataset[{name!r}].")
            if isinstance(entry, Mapping)
            else entry
            for name, entry in table.items()
        }
        recipe = cls(**values)
        return recipe


def _override_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RecipeOverride))


def _fields_from(mapping: Mapping[str, Any], valid: tuple[str, ...], where: str) -> dict[str, Any]:
    """Keyword arguments from the mapping form, checked with ``where`` in every message."""
    if not isinstance(mapping, Mapping):
        raise ArgumentError(f"{where}must be a mapping of recipe fields, got {mapping!r}")
    values = dict(mapping)
    check_known_keys(
        values,
        (*valid, "milestone"),
        owner=where.rstrip(". :") or "training recipe",
        noun="field",
        context=" (per-dataset values go under per_dataset, informational ones under notes)",
    )
    if "milestone" in values:
        if "milestones" in values:
            raise ArgumentError(f"{where}give milestone or milestones, not both")
        milestone = values.pop("milestone")
        # milestone 0 is the harness's "no decay"; None leaves the harness default
        no_decay = milestone == 0 and not isinstance(milestone, bool)
        values["milestones"] = None if milestone is None else () if no_decay else [milestone]
    for name, value in values.items():
        if name != "per_dataset":
            values[name] = _check_value(name, value, where)
    return values
