"""The refinement after the warm phase, on and off, where the float32 phase is short or long.

After a bfloat16 warm phase plain float32 iteration needs at least two evaluations (one to
leave bfloat16's rounding, one to check) and more where the map contracts slowly, as it
does later in training. ``SolverConfig.warm_refine`` turns all but the first of them into
bfloat16 corrections (``pcdeq_plugin.warm_start.refine_iterate``; the last one checks with
a certified bound on its error). This script solves one
pcDEQ block's forward fixed point in evaluation (``torch.no_grad()``), with the
refinement on and off, interleaved, in one process, at its weights after
``--warmup-steps`` training steps (``bench_speed.py``'s recipe) and with the recurrent
weight-norm gain scaled by each of ``--gains`` (a larger gain contracts more slowly).
It prints the iterations (warm / corrections), the worst final residual (where the
refinement's last check was certified, an upper bound on the float32 residual), the distance
between the two answers and the median solve time. It never asserts on time. Example::

    python benchmarks/bench_refinement.py --threads 1 --gains 1,2,4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speed_setup import build_variants, parse_case, warm_up_weights, workload  # noqa: E402
from _timing import machine_description, thread_settings  # noqa: E402

from pcdeq_plugin.cells import PcDEQBlock  # noqa: E402


def _gains(text: str) -> list[float]:
    try:
        gains = [float(g) for g in text.split(",")]
    except ValueError:
        gains = []
    if not gains or min(gains) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,2,4, got {text!r}")
    return gains


def _block_and_input(args: argparse.Namespace) -> tuple[PcDEQBlock, torch.Tensor]:
    """The case's (last) pcDEQ block, our defaults, and the pre-injection it sees in eval."""
    case = parse_case(args.model)
    device = torch.device("cpu")
    data = workload(case, batch=args.batch, test_samples=args.batch, device=device)
    weights = warm_up_weights(
        case, data, steps=args.warmup_steps, device=device, seed=0, tol=args.tol
    )
    variants, _ = build_variants(
        case, weights, device=device, tol=args.tol, ours_options={}, ablations=False
    )
    model = next(v.model for v in variants if v.name == "ours")
    model.eval()
    block = model.implicit_blocks()[-1]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(data.test_chunks()[0])
    handle.remove()
    return block, seen[0]


def _row(block: PcDEQBlock, pre: torch.Tensor, gain: float, repeats: int) -> list[str]:
    original = block.operator.parametrizations.weight.original0
    saved = original.detach().clone()
    configs = {"on": block.config, "off": block.config.replace(warm_refine=False)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    answers, records = {}, {}
    try:
        with torch.no_grad():
            original.mul_(gain)
            for _ in range(repeats + 1):  # the first round is untimed (allocator, kernels)
                for name, config in configs.items():
                    block.config = config
                    start = time.perf_counter()
                    answers[name] = block(pre)
                    times[name].append(time.perf_counter() - start)
                    records[name] = block.last_stats.forward
    finally:
        block.config = configs["on"]
        with torch.no_grad():
            original.copy_(saved)
    on, off = (statistics.median(times[name][1:]) * 1e3 for name in ("on", "off"))
    cells = [f"x{gain:g}"]
    for name in ("off", "on"):
        r = records[name]
        cells.append(f"{r.iterations} ({r.warm_iterations} warm, {r.refine_iterations} corr)")
    distance = float((answers["on"] - answers["off"]).norm() / answers["off"].norm())
    worst = max(float(records[name].residual.max()) for name in configs)
    cells += [f"{worst:.2e}", f"{distance:.1e}", f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x"]
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pcdeq-single-conv-1", help="a pcDEQ model[@CxHxW]")
    parser.add_argument("--gains", type=_gains, default=[1.0, 2.0, 4.0], help="e.g. 1,2,4")
    parser.add_argument("--threads", type=thread_settings, default=[1], help="e.g. 1,all")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=6, help="timed solves per setting")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup_steps < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup-steps >= 0")
    try:
        parse_case(args.model)
    except ValueError as exc:
        parser.error(str(exc))
    block, pre = _block_and_input(args)
    print(f"# {args.model}, block {block.block_name}, eval forward solve, batch {args.batch}")
    print(machine_description(torch.device("cpu")))
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\nthreads {threads}, median of {args.repeats}\n")
        print(
            "| gain | iterations, refinement off | iterations, refinement on | worst res | "
            "on vs off rel | off ms | on ms | speed-up |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for gain in args.gains:
            print("| " + " | ".join(_row(block, pre, gain, args.repeats)) + " |")


if __name__ == "__main__":
    main()
