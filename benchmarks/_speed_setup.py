"""What ``bench_speed.py`` measures: the cases, their data, and the variants of each network.

A *case* is a registered pcDEQ network at an input shape (``pcdeq-single-conv-1@3x32x32``).
Its *variants* share one set of weights (trained a few steps off the initialisation, then
copied into each):

* ``paper``: the paper's algorithm (:mod:`_paper_reference`) on our NCHW float32 network;
* ``ours-plain``: our layers with every speed option forced off;
* ``ours``: our layers with their defaults (plus any ``--option``);
* with ``--ablations``, ``ours`` with one option forced off at a time, so the table shows
  what each option contributes;
* with ``--bound``, ``0-iteration bound``: ``ours`` with every block's solve replaced by
  one differentiable cell evaluation at ``z = 0`` (``sigma(W 0 + u)``, graph included):
  everything the network does except the fixed-point and adjoint iterations, so a lower
  bound on the time of any solver at these weights. Its ratio to the paper is the largest
  speed-up a faster solve could bring.
* with ``--floor``, ``linear-map floor``: the 0-iteration bound plus, in every block, the
  bare float32 linear maps (convolutions) of the paper's iteration counts on one training
  batch (before the timed ones) and on the eval batch: ``k - 1`` maps ``W z`` in the
  forward pass (the first iteration is free from zero) and ``k_b`` transposed maps
  ``W^T g`` in the backward pass, in ``ours``' layout, and nothing else per iteration
  (no activation, injection, residual, check).
  Its ratio to the paper is the largest speed-up of a float32 plain iteration that takes
  the paper's iterations, if everything but its linear maps cost nothing.

The speed options are detected, not assumed: a library without them gets no
``ours-plain`` (or ablation) variant, and the table says why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _paper_reference import paper_records, paper_reference_model

from pcdeq_plugin import ImplicitModel, SolverConfig, build_model, list_models
from pcdeq_plugin.bench.datasets import load_mnist5k

__all__ = [
    "DEFAULT_CASES",
    "Case",
    "NUM_CLASSES",
    "BOUND",
    "FLOOR",
    "SolveCounts",
    "Variant",
    "Workload",
    "build_variants",
    "linear_map_floor_model",
    "paper_solve_counts",
    "ours_option",
    "parse_case",
    "plain_options",
    "warm_up_weights",
    "workload",
    "zero_iteration_model",
]

NUM_CLASSES = 10
MNIST_SHAPE = (1, 28, 28)
DEFAULT_CASES: tuple[str, ...] = (
    "pcdeq-linear-1",
    "pcdeq-linear-2",
    "pcdeq-single-conv-1",
    "pcdeq-single-conv-2",
    "pcdeq-multi-conv-1",
    "pcdeq-multi-conv-2",
    "pcdeq-single-conv-1@3x32x32",
)
#: solver options (SolverConfig fields) that switch a speed feature off
_PLAIN_SOLVER = {
    "warm_start": "off",
    "warm_refine": False,
    "adjoint": "autograd",
    "reuse_step_graph": False,
}
#: conv-network option that forces the NCHW layout
_PLAIN_LAYOUT = {"memory_format": "contiguous"}
#: ablation variant -> the one option it forces off
ABLATIONS: dict[str, str] = {
    "ours-no-warm-start": "warm_start",
    "ours-no-refinement": "warm_refine",
    "ours-autograd-adjoint": "adjoint",
    "ours-two-evaluations": "reuse_step_graph",
    "ours-nchw": "memory_format",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One network at one input shape."""

    model: str
    input_shape: tuple[int, int, int]

    @property
    def label(self) -> str:
        if self.input_shape == MNIST_SHAPE:
            return self.model
        return f"{self.model}@{'x'.join(map(str, self.input_shape))}"


def parse_case(text: str) -> Case:
    """``name`` (MNIST-sized, 1x28x28) or ``name@CxHxW``; only pcDEQ networks."""
    name, _, shape = text.strip().partition("@")
    pcdeq = [m for m in list_models() if m.startswith("pcdeq-")]
    if name not in pcdeq:
        raise ValueError(f"unknown pcDEQ model {name!r}; available: {', '.join(pcdeq)}")
    if not shape:
        return Case(name, MNIST_SHAPE)
    try:
        dims = tuple(int(d) for d in shape.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"bad input shape {shape!r} in {text!r}; expected CxHxW, e.g. 3x32x32")
    return Case(name, dims)  # type: ignore[arg-type]


def plain_options(case: Case) -> dict[str, Any]:
    """The build options that switch off every speed feature this library has."""
    fields = SolverConfig.field_names()
    options = {k: v for k, v in _PLAIN_SOLVER.items() if k in fields}
    if "conv" in case.model:
        try:
            build_model(case.model, case.input_shape, NUM_CLASSES, **_PLAIN_LAYOUT)
        except TypeError as exc:  # no layout option yet: the message names the valid ones
            if "memory_format" not in str(exc):
                raise
        else:
            options.update(_PLAIN_LAYOUT)
    return options


# -- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """Real digits shaped for the case: a training stream, a timing batch, a test set."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    batch: int

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive training batches, cycling over the shuffled training images."""
        n = self.train_images.shape[0] // self.batch * self.batch
        start = 0
        while True:
            stop = start + self.batch
            yield self.train_images[start:stop], self.train_labels[start:stop]
            start = stop % n

    def test_chunks(self) -> list[torch.Tensor]:
        """The test images in batches of ``batch`` (the reference's residual is batch-wide)."""
        return list(self.test_images.split(self.batch))


def _fit_shape(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """MNIST digits as ``shape``: centred zero padding (or resizing), channels repeated."""
    channels, height, width = shape
    if (height, width) != tuple(images.shape[2:]):
        if height >= images.shape[2] and width >= images.shape[3]:
            top, left = (height - images.shape[2]) // 2, (width - images.shape[3]) // 2
            pad = (left, width - images.shape[3] - left, top, height - images.shape[2] - top)
            images = F.pad(images, pad)
        else:
            images = F.interpolate(images, size=(height, width), mode="bilinear")
    return images.expand(-1, channels, -1, -1).contiguous()


def workload(
    case: Case, *, batch: int, test_samples: int, device: torch.device, seed: int = 0
) -> Workload:
    """mnist5k (embedded, offline) shuffled with ``seed`` and fitted to the case's shape."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = load_mnist5k("train").tensors
    test_x, _ = load_mnist5k("test").tensors
    order = torch.randperm(train_x.shape[0], generator=generator)
    test_order = torch.randperm(test_x.shape[0], generator=generator)[:test_samples]
    return Workload(
        train_images=_fit_shape(train_x[order], case.input_shape).to(device),
        train_labels=train_y[order].to(device),
        test_images=_fit_shape(test_x[test_order], case.input_shape).to(device),
        batch=batch,
    )


# -- models ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One way of running the case's network (all variants hold the same weights)."""

    name: str
    model: ImplicitModel
    is_paper: bool = False
    #: a timing bound, not a solver: no answers to compare (see zero_iteration_model)
    is_bound: bool = False
    #: the bound's iteration counts per phase (``fwd``, ``bwd``, ``eval``; the floor's)
    counts: dict[str, int] | None = None


BOUND = "0-iteration bound"


def zero_iteration_model(model: ImplicitModel) -> ImplicitModel:
    """``model`` with each block's solve replaced by one cell evaluation at ``z = 0``, in place.

    The evaluation keeps its graph (the linear map's weight gradient is computed in
    backward, as after a real solve), so train and eval steps cost everything but the
    iterations.
    """
    for block in model.implicit_blocks():

        def forward(pre_injection: torch.Tensor, _block: Any = block) -> torch.Tensor:
            u = _block.injection(pre_injection)
            return _block.cell(torch.zeros_like(u), u)

        block.forward = forward  # an instance attribute shadows the class's forward
    return model


FLOOR = "linear-map floor"


@dataclasses.dataclass(frozen=True)
class SolveCounts:
    """One block's iterations in the paper's algorithm: training forward and backward, eval."""

    forward: int
    backward: int
    evaluation: int


def paper_solve_counts(
    case: Case,
    weights: dict[str, torch.Tensor],
    data: Workload,
    *,
    device: torch.device,
    tol: float,
) -> list[SolveCounts]:
    """Each block's paper iterations on the first training batch and the eval batch.

    Measured on a copy of the paper variant (forward and backward, no optimizer step), so
    no timed model's weights or BatchNorm statistics change.
    """
    model = _build(case, device, **plain_options(case))
    model.load_state_dict(weights)
    paper_reference_model(model, tol=tol)
    model.eval()  # first: the training forward below updates the BatchNorm statistics
    with torch.no_grad():
        model(data.test_chunks()[0])
    evaluated = [r.forward_iterations for r in paper_records(model)]
    x, y = next(data.train_batches())
    model.train()
    F.cross_entropy(model(x), y).backward()
    return [
        SolveCounts(r.forward_iterations, r.backward_iterations or 0, evaluation)
        for r, evaluation in zip(paper_records(model), evaluated)
    ]


def linear_map_floor_model(model: ImplicitModel, counts: Sequence[SolveCounts]) -> ImplicitModel:
    """The 0-iteration ``model`` plus the bare linear maps of ``counts``' iterations, in place.

    Per block: forward, the :func:`zero_iteration_model` step (one differentiable cell
    evaluation at ``z = 0``) and ``k - 1`` linear maps of its output under ``no_grad``
    (``k`` the training or evaluation count); backward, a hook that applies ``k_b``
    transposed maps to the incoming gradient and leaves it unchanged. The maps' results
    are dropped, and their input is the same tensor every time (repeated maps of a
    contraction would decay towards denormals, which are slow on a CPU).
    """
    blocks = model.implicit_blocks()
    if len(counts) != len(blocks):
        raise ValueError(f"{len(counts)} solve counts for {len(blocks)} blocks")
    zero_iteration_model(model)
    for block, count in zip(blocks, counts):

        def forward(
            pre_injection: torch.Tensor,
            _block: Any = block,
            _count: SolveCounts = count,
            _zero_iteration: Any = block.forward,
        ) -> torch.Tensor:
            z = _zero_iteration(pre_injection)
            weight = _block.weight.detach()
            training = torch.is_grad_enabled()
            with torch.no_grad():
                state = z.detach()
                for _ in range((_count.forward if training else _count.evaluation) - 1):
                    _block.linear_map(state, weight)
            if z.requires_grad and _count.backward:

                def hook(grad: torch.Tensor) -> None:
                    for _ in range(_count.backward):
                        _block.transposed_map(grad, weight)

                z.register_hook(hook)
            return z

        block.forward = forward  # an instance attribute shadows the class's forward
    return model


def _build(case: Case, device: torch.device, **options: Any) -> ImplicitModel:
    model = build_model(case.model, case.input_shape, NUM_CLASSES, **options)
    return model.to(device)


def warm_up_weights(
    case: Case, data: Workload, *, steps: int, device: torch.device, seed: int, tol: float
) -> dict[str, torch.Tensor]:
    """Weights after ``steps`` AdamW steps (the paper's recipe) from the initialisation.

    Trained with our plain float32 path, so the weights do not depend on the speed options.
    """
    torch.manual_seed(seed)
    model = _build(case, device, tol=tol, on_failure="ignore", **plain_options(case))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1.5e-2)
    batches = data.train_batches()
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        model.after_optimizer_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_variants(
    case: Case,
    weights: dict[str, torch.Tensor],
    *,
    device: torch.device,
    tol: float,
    ours_options: dict[str, Any],
    ablations: bool,
    bound: bool = False,
    floor: Sequence[SolveCounts] | None = None,
) -> tuple[list[Variant], list[str]]:
    """The case's variants, each loaded with ``weights``; and notes on skipped variants.

    ``floor``: the paper's per-block iteration counts (:func:`paper_solve_counts`) for a
    :data:`FLOOR` variant, or ``None`` for none.
    """
    plain = plain_options(case)
    solver = {"tol": tol}
    specs: list[tuple[str, dict[str, Any], bool]] = [("paper", plain, True)]
    notes: list[str] = []
    if plain:
        specs.append(("ours-plain", {**solver, **plain}, False))
    else:
        notes.append(
            f"{case.label}: ours-plain skipped: this pcdeq_plugin has none of the speed "
            "options (SolverConfig.warm_start/warm_refine/adjoint/reuse_step_graph, "
            "memory_format), so "
            "it equals ours"
        )
    ours_options = dict(ours_options)
    for key in _PLAIN_LAYOUT:  # a layout option means nothing to a linear network
        if key in ours_options and key not in plain:
            notes.append(f"{case.label}: --option {key} not applied (the network has no {key})")
            del ours_options[key]
    specs.append(("ours", {**solver, **ours_options}, False))
    if ablations:
        for name, key in ABLATIONS.items():
            # one option off, the others as in ours (an option set by --option stays set)
            if key in plain:
                specs.append((name, {**solver, **ours_options, key: plain[key]}, False))
            else:
                notes.append(f"{case.label}: {name} skipped: no {key} option to force off here")
    if bound:
        specs.append((BOUND, {**solver, **ours_options}, False))
    if floor is not None:
        specs.append((FLOOR, {**solver, **ours_options}, False))
    variants = []
    for name, options, is_paper in specs:
        model = _build(case, device, **options)
        model.load_state_dict(weights)
        if is_paper:
            paper_reference_model(model, tol=tol)
        counts = None
        if name == BOUND:
            zero_iteration_model(model)
        elif name == FLOOR:
            assert floor is not None
            linear_map_floor_model(model, floor)
            counts = {
                "fwd": sum(c.forward - 1 for c in floor),
                "bwd": sum(c.backward for c in floor),
                "eval": sum(c.evaluation - 1 for c in floor),
            }
        bounded = name in (BOUND, FLOOR)
        variants.append(Variant(name, model, is_paper, is_bound=bounded, counts=counts))
    return variants, notes


def ours_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE read as JSON when it parses, else a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed
