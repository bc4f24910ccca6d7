"""Speed of the six pcDEQ networks with the plain and the safeguarded Anderson solver.

For each network (built by ``pcdeq_plugin.build_model(name, (1, 28, 28), 10)``) on a batch
of random nonnegative MNIST-sized images, and for each solver, it prints medians over
``--repeats`` runs of:

* forward time (no grad, eval mode) and forward+backward time (train mode, cross-entropy
  on random labels);
* forward and backward iterations, summed over the network's implicit blocks, and the
  number of samples that did not converge (the cap is 200 by default);
* ``fwd ratio``: forward solve time / (forward iterations x one cell evaluation
  ``sigma(W z + u)`` at the fixed point); ``bwd ratio``: backward solve time / (backward
  iterations x one vector-Jacobian product). A ratio near 1 means the solver adds little
  besides the map itself; Anderson pays for its least-squares step there.

It never asserts on time. Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_pcdeq.py --repeats 3 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pcdeq_plugin import ImplicitModel, build_model, list_models, list_solvers

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    INPUT_SHAPE,
    NUM_CLASSES,
    machine_description,
    median_time,
    mnist_workload,
    timed,
)

PCDEQ_MODELS: tuple[str, ...] = (
    "pcdeq-linear-1",
    "pcdeq-linear-2",
    "pcdeq-single-conv-1",
    "pcdeq-single-conv-2",
    "pcdeq-multi-conv-1",
    "pcdeq-multi-conv-2",
)
SOLVERS: tuple[str, ...] = ("fixed_point", "anderson")


def _capture_block_io(model: ImplicitModel, x: torch.Tensor) -> list[tuple[Any, Any, Any]]:
    """(block, pre-injection, fixed point) of every implicit block, from one no-grad forward."""
    captured: list[tuple[Any, Any, Any]] = []
    handles = [
        block.register_forward_hook(
            lambda mod, inputs, output: captured.append((mod, inputs[0], output))
        )
        for block in model.implicit_blocks()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _block_costs(
    block: Any,
    pre_injection: torch.Tensor,
    z_star: torch.Tensor,
    device: torch.device,
    repeats: int,
) -> tuple[float, float] | None:
    """Median seconds of one cell evaluation and of one VJP at the block's fixed point."""
    if not all(hasattr(block, attr) for attr in ("cell", "injection", "weight")):
        return None  # not a pcDEQ block: no cell to time
    with torch.no_grad():
        u = block.injection(pre_injection)
        weight = block.weight.detach()
        cell = median_time(lambda: block.cell(z_star, u, weight), device, 5 * repeats)
    z_leaf = z_star.detach().requires_grad_()
    f0 = block.cell(z_leaf, u, weight)
    v = torch.randn_like(f0)
    vjp = median_time(
        lambda: torch.autograd.grad(f0, z_leaf, v, retain_graph=True), device, 5 * repeats
    )
    return cell, vjp


def _ratio(seconds: float, work: float) -> float:
    return seconds / work if work > 0 else float("nan")


def bench_model(
    name: str,
    solver: str,
    *,
    batch: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one network with one solver; returns one table row (medians)."""
    torch.manual_seed(seed)
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, solver=solver, on_failure="ignore")
    if device.type != "cpu":  # models are built on the CPU; move only when needed
        model.to(device)
    x, forward, forward_backward = mnist_workload(model, batch, device)

    model.eval()
    forward()  # warm-up
    fwd_times, fwd_iters, fwd_solve, failed = [], [], [], []
    for _ in range(repeats):
        fwd_times.append(timed(forward, device))
        stats = [s.forward for s in model.solver_stats() if s.forward is not None]
        fwd_iters.append(sum(s.iterations for s in stats))
        fwd_solve.append(sum(s.seconds for s in stats))
        failed.append(sum(s.num_failed for s in stats))
    captured = _capture_block_io(model, x)
    costs = [_block_costs(*c, device, repeats) for c in captured]
    last_fwd = [s.forward for s in model.solver_stats()]

    model.train()
    forward_backward()  # warm-up
    fb_times, bwd_iters, bwd_solve = [], [], []
    for _ in range(repeats):
        fb_times.append(timed(forward_backward, device))
        stats = [s.backward for s in model.solver_stats() if s.backward is not None]
        bwd_iters.append(sum(s.iterations for s in stats))
        bwd_solve.append(sum(s.seconds for s in stats))
    last_bwd = [s.backward for s in model.solver_stats()]

    fwd_ratio = bwd_ratio = float("nan")
    if costs and all(c is not None for c in costs):
        fwd_work = sum(s.iterations * c[0] for s, c in zip(last_fwd, costs) if s is not None)
        bwd_work = sum(s.iterations * c[1] for s, c in zip(last_bwd, costs) if s is not None)
        fwd_ratio = _ratio(sum(s.seconds for s in last_fwd if s is not None), fwd_work)
        bwd_ratio = _ratio(sum(s.seconds for s in last_bwd if s is not None), bwd_work)
    return {
        "model": name,
        "solver": solver,
        "blocks": len(model.implicit_blocks()),
        "fwd_ms": 1e3 * statistics.median(fwd_times),
        "fwd_bwd_ms": 1e3 * statistics.median(fb_times),
        "fwd_iter": statistics.median(fwd_iters),
        "bwd_iter": statistics.median(bwd_iters),
        "failed": max(failed),
        "fwd_solve_ms": 1e3 * statistics.median(fwd_solve),
        "bwd_solve_ms": 1e3 * statistics.median(bwd_solve),
        "fwd_ratio": fwd_ratio,
        "bwd_ratio": bwd_ratio,
    }


COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("solver", "solver", "{}"),
    ("blocks", "blocks", "{}"),
    ("fwd_ms", "fwd ms", "{:.1f}"),
    ("fwd_bwd_ms", "fwd+bwd ms", "{:.1f}"),
    ("fwd_iter", "fwd iter", "{:g}"),
    ("bwd_iter", "bwd iter", "{:g}"),
    ("failed", "unconverged", "{}"),
    ("fwd_solve_ms", "fwd solve ms", "{:.1f}"),
    ("bwd_solve_ms", "bwd solve ms", "{:.1f}"),
    ("fwd_ratio", "fwd ratio", "{:.2f}"),
    ("bwd_ratio", "bwd ratio", "{:.2f}"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        if "error" in row:  # the model could not be measured: say why in the row
            cells = [row["model"], row["solver"], row["error"]] + [""] * (len(COLUMNS) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument(
        "--models", default=",".join(PCDEQ_MODELS), help="comma-separated registered model names"
    )
    parser.add_argument(
        "--solvers", default=",".join(SOLVERS), help="comma-separated registered solver names"
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch < 2:  # BatchNorm in train mode needs two samples
        parser.error(f"--batch must be >= 2, got {args.batch}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    for kind, names, available in (
        ("model", args.models, list_models()),
        ("solver", args.solvers, list_solvers()),
    ):
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            parser.error(f"unknown {kind}(s) {unknown or names}; available: {', '.join(available)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the Markdown table and return its rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        for solver in args.solvers:
            try:
                row = bench_model(
                    name,
                    solver,
                    batch=args.batch,
                    repeats=args.repeats,
                    device=device,
                    seed=args.seed,
                )
            except TypeError as exc:  # e.g. a model family without a `solver` option (node)
                row = {"model": name, "solver": solver, "error": f"error: {exc}"}
            rows.append(row)
    print(f"# pcDEQ solver benchmark (batch {args.batch}, median of {args.repeats} runs)")
    print(machine_description(device))
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
