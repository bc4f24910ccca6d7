"""Does the fast path train as well as the plain float32 path? (accuracy, not speed)

Trains ``pcdeq-single-conv-1`` (``small`` preset) on the embedded ``mnist5k`` for
``--epochs`` epochs with each seed, once with the library's fast defaults and once with
every speed option forced off (the plain float32 path: ``warm_start="off"``,
``adjoint="autograd"``, ``reuse_step_graph=False``, ``memory_format="contiguous"``, those
this library has), through the harness's
``pcdeq_plugin.bench.run(config)``, and prints the final test accuracy of both (mean ± std
over seeds, and per seed) and their difference. Issue 9's target: within 0.5 points.

The full run (3 epochs, seeds 0,1,2: six runs of about a minute each on one CPU core)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy_fast_vs_plain.py

A quick smoke: ``--epochs 1 --seeds 0 --train-limit 256 --test-limit 128``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speed_setup import Case, plain_options  # noqa: E402
from _timing import cpu_model  # noqa: E402

from pcdeq_plugin.bench import run  # noqa: E402

MODEL = "pcdeq-single-conv-1"


def train(options: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One harness run; returns its summary (``test_acc`` is a fraction)."""
    config = {
        "model": MODEL,
        "preset": "small",
        "dataset": "mnist5k",
        "epochs": args.epochs,
        "seed": seed,
        "device": args.device,
        "model_options": dict(options),
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "progress": False,
    }
    summary = run(config)
    if summary["status"] != "ok":
        raise RuntimeError(
            f"run with seed {seed} and model options {options} ended {summary['status']!r}: "
            f"{summary.get('error')}"
        )
    return summary


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--train-limit", type=int, default=None, help="first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images")
    parser.add_argument(
        "--fast-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="force an option on the fast path, repeatable (e.g. warm_start=bf16: the small "
        "preset's 16 channels are below the warm start's 'auto' threshold)",
    )
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or args.epochs < 1:
        parser.error("give at least one seed and --epochs >= 1")
    return args


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not (sep and key):
        raise SystemExit(f"--fast-option expects KEY=VALUE, got {item!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Train both paths with every seed; print the comparison; return accuracies (points)."""
    args = parse_args(argv)
    plain = plain_options(Case(MODEL, (1, 28, 28)))
    if not plain:
        raise SystemExit(
            "this pcdeq_plugin has no speed options (SolverConfig.warm_start/adjoint/"
            "reuse_step_graph, memory_format): the fast and the plain path are the same, nothing to compare"
        )
    forced = dict(_key_value(item) for item in args.fast_option)
    paths = {"fast defaults": forced, "plain float32": plain}
    accuracy: dict[str, list[float]] = {name: [] for name in paths}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for seed in args.seeds:
        for name, options in paths.items():  # interleaved: machine drift hits both
            summary = train(options, seed, args)
            accuracy[name].append(100.0 * summary["test_acc"])
            seconds[name].append(summary["seconds_per_epoch"])
    print(f"# {MODEL} (small) on mnist5k: fast defaults vs plain float32")
    if forced:
        print(f"fast path forced: {forced}")
    print(
        f"{args.epochs} epoch(s), seeds {args.seeds}, device {args.device}, CPU {cpu_model()}; "
        f"plain options {plain}"
    )
    print()
    print("| path | test acc (%) mean ± std | per seed | train s/epoch |")
    print("|---|---|---|---|")
    for name in paths:
        per_seed = ", ".join(f"{a:.2f}" for a in accuracy[name])
        s_epoch = statistics.mean(seconds[name])
        print(f"| {name} | {_mean_std(accuracy[name])} | {per_seed} | {s_epoch:.1f} |")
    diffs = [f - p for f, p in zip(accuracy["fast defaults"], accuracy["plain float32"])]
    print()
    print(
        f"fast - plain: {statistics.mean(diffs):+.2f} points (per seed: "
        + ", ".join(f"{d:+.2f}" for d in diffs)
        + ")"
    )
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1:])
