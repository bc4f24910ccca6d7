"""pcDEQ against the paper's own algorithm: same weights, same answers, how much faster?

For each case (a pcDEQ network at an input shape; default: the six networks at MNIST size
and the single-conv net at 3x32x32, 125 channels) it trains the network a few steps off the
initialisation (``--warmup-steps``, AdamW as in the paper, on embedded mnist5k digits; the
3x32x32 case pads them and repeats the channel), copies the weights into every variant
(``paper``: the paper's algorithm, see ``_paper_reference.py``; ``ours-plain``: our layers
with the speed options off; ``ours``: our defaults) and reports, in one process:

* ``train ms``: one training step (forward, backward, AdamW step, projection through
  ``model.after_optimizer_step()``) on a batch of ``--batch``; ``eval ms``: one forward in
  ``model.eval()`` under ``torch.no_grad()``. Medians of ``--repeats``, the variants
  interleaved within each repeat. ``x paper``: the paper's median over the variant's.
* ``fwd it`` / ``bwd it``: forward and backward iterations of the training step, summed
  over the network's blocks (median); ``(n warm)``: of which in the low-precision warm start
  (shown where one ran); ``(m corr)``: of which refinement corrections after it
  (``SolverConfig.warm_refine``). ``eval it``: the same for the eval forward.
* ``z* rel``: relative difference of the blocks' fixed points from the paper's (worst
  block), ``logits rel``: of the logits, ``same pred``: fraction of identical predictions,
  all on ``--test-samples`` test digits in eval mode; ``worst res``: the largest per-sample
  residual of the returned fixed points, recomputed in float64; ``within tol``: the fraction
  of samples (and blocks) below ``--tol``.

``--bound`` and ``--floor`` add two timing bounds (no answers; see ``_speed_setup.py``):
the network with 0-iteration solves, and that network plus the bare float32 linear maps
of the paper's iteration counts.

Each thread setting (``--threads 1,all``) rebuilds the variants from the same weights. It
never asserts on time. Example (the full table)::

    python benchmarks/bench_speed.py --threads 1,all --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speed_agreement import agreement  # noqa: E402
from _speed_setup import (  # noqa: E402
    DEFAULT_CASES,
    Case,
    build_variants,
    ours_option,
    paper_solve_counts,
    parse_case,
    warm_up_weights,
    workload,
)
from _speed_timing import time_variants  # noqa: E402
from _timing import all_threads, cpu_model, thread_settings  # noqa: E402

from pcdeq_plugin import ConvergenceWarning  # noqa: E402


def bench_case(case: Case, args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    """Rows (one per thread setting and variant) and notes for one case."""
    data = workload(case, batch=args.batch, test_samples=args.test_samples, device=device)
    torch.set_num_threads(max(args.threads))
    weights = warm_up_weights(
        case, data, steps=args.warmup_steps, device=device, seed=args.seed, tol=args.tol
    )
    rows, notes, agree = [], [], None
    floor = None
    if args.floor:
        floor = paper_solve_counts(case, weights, data, device=device, tol=args.tol)
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants, notes = build_variants(
            case,
            weights,
            device=device,
            tol=args.tol,
            ours_options=args.options,
            ablations=args.ablations,
            bound=args.bound,
            floor=floor,
        )
        if agree is None:  # before any timed step changes the weights
            agree = agreement(variants, data.test_chunks(), args.tol)
        times = time_variants(variants, data, repeats=args.repeats, device=device)
        paper = times["paper"]
        for variant in variants:
            t = times[variant.name]
            rows.append(
                {
                    "case": case.label,
                    "threads": threads,
                    "variant": variant.name,
                    **t,
                    "train_x": paper["train_ms"] / t["train_ms"],
                    "eval_x": paper["eval_ms"] / t["eval_ms"],
                    **agree[variant.name],
                }
            )
    return rows, notes


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _iters(row: dict[str, Any], phase: str) -> str:
    """``12``, or with a warm start that ran ``12 (4 warm)``, and with refinement
    corrections ``12 (4 warm, 1 corr)``."""
    text = f"{row[f'{phase}_it']:g}"
    parts = [
        f"{row[key]:g} {label}"
        for key, label in ((f"{phase}_warm_it", "warm"), (f"{phase}_corr_it", "corr"))
        if row.get(key)
    ]
    return f"{text} ({', '.join(parts)})" if parts else text


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("model", lambda r: r["case"]),
    ("threads", lambda r: str(r["threads"])),
    ("variant", lambda r: r["variant"]),
    ("train ms", lambda r: _fmt(r["train_ms"], "{:.1f}")),
    ("eval ms", lambda r: _fmt(r["eval_ms"], "{:.1f}")),
    ("train x paper", lambda r: _fmt(r["train_x"], "{:.2f}x")),
    ("eval x paper", lambda r: _fmt(r["eval_x"], "{:.2f}x")),
    ("fwd it", lambda r: _iters(r, "fwd")),
    ("bwd it", lambda r: _iters(r, "bwd")),
    ("eval it", lambda r: _iters(r, "eval")),
    ("z* rel", lambda r: _fmt(r["z_rel"], "{:.1e}")),
    ("logits rel", lambda r: _fmt(r["logits_rel"], "{:.1e}")),
    ("worst res", lambda r: _fmt(r["worst_residual"], "{:.1e}")),
    ("within tol", lambda r: _fmt(r["within_tol"], "{:.4f}")),
    ("same pred", lambda r: _fmt(r["same_pred"], "{:.4f}")),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def describe(device: torch.device, args: argparse.Namespace) -> str:
    """The machine and settings, for the lines above the table."""
    where = f"CPU {cpu_model()}, {all_threads()} threads available"
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}; {where}"
    return (
        f"{where}; torch {torch.__version__}; device {device}; batch {args.batch}; "
        f"median of {args.repeats} interleaved repeats; {args.warmup_steps} training steps "
        f"off the initialisation; tol {args.tol:g}; agreement on {args.test_samples} mnist5k "
        "test digits (3x32x32: zero-padded, channel repeated)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_CASES),
        help="comma-separated pcDEQ model names, each optionally @CxHxW (default 1x28x28)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--threads", type=thread_settings, default=[1], help="e.g. 1,all (default 1)"
    )
    parser.add_argument("--warmup-steps", type=int, default=20, help="training steps first")
    parser.add_argument("--tol", type=float, default=1e-4, help="solver tolerance (all)")
    parser.add_argument("--test-samples", type=int, default=256, help="for the agreement")
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="build option of the 'ours' variant, repeatable (warm_start=bf16)",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="also 'ours' with one option off at a time"
    )
    parser.add_argument(
        "--bound",
        action="store_true",
        help="also the network with 0-iteration solves: the fastest any solver could be",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the 0-iteration network plus the bare float32 linear maps of the paper's "
        "iteration counts: the fastest a float32 plain iteration could be",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value, low in (
        ("--repeats", args.repeats, 1),
        ("--batch", args.batch, 2),  # BatchNorm in train mode needs two samples
        ("--warmup-steps", args.warmup_steps, 0),
        ("--test-samples", args.test_samples, 1),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not (args.tol > 0):
        parser.error(f"--tol must be positive, got {args.tol}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    try:
        args.cases = [parse_case(m) for m in args.models.split(",") if m.strip()]
        args.options = dict(ours_option(o) for o in args.options)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.cases:
        parser.error("--models names no model")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the Markdown table and return its rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    previous_threads = torch.get_num_threads()
    rows, notes = [], []
    try:
        with warnings.catch_warnings():
            # the paper never warns; ours would on a cap, and the table shows residuals
            warnings.simplefilter("ignore", ConvergenceWarning)
            for case in args.cases:
                case_rows, case_notes = bench_case(case, args, device)
                rows += case_rows
                notes += case_notes
    finally:
        torch.set_num_threads(previous_threads)
    print("# pcDEQ vs the paper's algorithm (same weights)")
    print(describe(device, args))
    print()
    print(format_table(rows))
    if notes:
        print("\nnotes:")
        for note in dict.fromkeys(notes):  # each once, in order
            print(f"- {note}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
