"""Plain iteration vs safeguarded Anderson on a slowly converging pcDEQ-1 map.

A dense pcDEQ-1 layer ``z = tanh(W z + u)`` with ``W >= 0`` scaled to spectral radius 1
and tiny injections ``u <= --injection`` has a Thompson contraction factor close to 1
(pcdeq.md section 1.7: the local rate is ``1 - kappa`` with ``kappa = min g(0)/z*``), so
plain iteration is slow; this is where Anderson acceleration pays. Prints iterations and
the median solve time over ``--repeats`` runs. It never asserts on time. Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_slow_map.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_description  # noqa: E402

from pcdeq_plugin import get_solver  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=30, help="state size (default 30)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument(
        "--injection", type=float, default=0.01, help="largest injection u (default 0.01)"
    )
    parser.add_argument("--tol", type=float, default=1e-8, help="tolerance (default 1e-8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    args = parser.parse_args(argv)
    if args.width < 1 or args.batch < 1 or args.repeats < 1 or not args.injection > 0:
        parser.error("--width, --batch, --repeats must be >= 1 and --injection > 0")

    dtype = torch.float64  # explicit, so importing this script changes no global default
    torch.manual_seed(1)
    w = torch.rand(args.width, args.width, dtype=dtype)
    w = w / torch.linalg.eigvals(w).abs().max()
    u = torch.rand(args.batch, args.width, dtype=dtype) * args.injection

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + u)

    print(
        f"# slow pcDEQ-1 map: width {args.width}, batch {args.batch}, u <= {args.injection:g}, "
        f"tol {args.tol:g}, median of {args.repeats}"
    )
    print(machine_description(torch.device("cpu")))
    print()
    print("| solver | iterations | converged | solve ms |")
    print("|---|---|---|---|")
    for name in ("fixed_point", "anderson"):
        solver = get_solver(name)
        runs = [
            solver(
                f, torch.zeros(args.batch, args.width, dtype=dtype), tol=args.tol, max_iter=10_000
            )
            for _ in range(args.repeats)
        ]
        stats = runs[-1].stats
        ms = statistics.median(r.stats.seconds for r in runs) * 1e3
        print(f"| {name} | {stats.iterations} | {stats.all_converged} | {ms:.1f} |")


if __name__ == "__main__":
    main()
