"""Side by side: one model of each implicit-model family, speed, iterations and memory.

For one registered model per family (``pcdeq-single-conv-1``, ``deq-single-conv``,
``mondeq-single-conv``, ``node``, ``anode``, ``subdeq-conv``, plus the first model of any
other registered family) on random nonnegative MNIST-sized images it prints medians over
``--repeats`` runs of forward time (no grad, eval mode), forward+backward time (train
mode), forward/backward iterations or function evaluations (summed over implicit blocks),
unconverged samples and peak memory, with ratios to the pcDEQ model. A preferred model that
is not registered is listed as missing.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident-set
high-water mark (``resource.getrusage``) of a fresh worker process per model, minus the
mark after imports and model construction (``tracemalloc`` does not see torch's
allocator). ``--in-process`` skips the workers (faster) and reports memory as n/a.

It never asserts on time. Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_families.py --preset small --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pcdeq_plugin import build_model, list_models
from pcdeq_plugin.registry import MODELS

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    INPUT_SHAPE,
    NUM_CLASSES,
    machine_description,
    mnist_workload,
    timed,
)

#: the model that represents each family, in table order (pcDEQ first: the reference)
PREFERRED: dict[str, str] = {
    "pcdeq": "pcdeq-single-conv-1",
    "deq": "deq-single-conv",
    "mondeq": "mondeq-single-conv",
    "node": "node",
    "anode": "anode",
    "subdeq": "subdeq-conv",
}
_RESULT_MARK = "BENCH_FAMILIES_RESULT "


def default_models() -> list[tuple[str, str | None]]:
    """``(family, model name or None if missing)`` for every preferred and registered family."""
    registered = {name: spec.family for name, spec in MODELS.items()}
    chosen: list[tuple[str, str | None]] = [
        (family, name if name in registered else None) for family, name in PREFERRED.items()
    ]
    for family in sorted(set(registered.values()) - set(PREFERRED)):
        chosen.append((family, min(n for n, f in registered.items() if f == family)))
    return chosen


def _rss_bytes() -> int | None:
    """Resident-set high-water mark of this process, or ``None`` where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def _sum_stats(model: Any, phase: str) -> tuple[int, str, int]:
    records = [getattr(s, phase) for s in model.solver_stats()]
    records = [r for r in records if r is not None]
    units = sorted({r.unit for r in records})
    return (
        sum(r.iterations for r in records),
        "/".join(units) or "-",
        sum(r.num_failed for r in records),
    )


def measure(
    name: str,
    *,
    preset: str | None,
    batch: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
    track_memory: bool = True,
) -> dict[str, Any]:
    """Measure one model; returns one table row (medians)."""
    torch.manual_seed(seed)
    spec = MODELS.get(name)
    use_preset = preset if preset in spec.presets else None
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, preset=use_preset)
    if device.type != "cpu":  # models are built on the CPU; move only when needed
        model = model.to(device)
    x, forward, forward_backward = mnist_workload(model, batch, device)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.max_memory_allocated(device)
    else:
        base = _rss_bytes() if track_memory else None

    model.eval()
    forward()  # warm-up
    fwd_t, fwd_n, failed = [], [], []
    for _ in range(repeats):
        fwd_t.append(timed(forward, device))
        n, fwd_unit, bad = _sum_stats(model, "forward")
        fwd_n.append(n)
        failed.append(bad)
    model.train()
    forward_backward()  # warm-up
    fb_t, bwd_n = [], []
    for _ in range(repeats):
        fb_t.append(timed(forward_backward, device))
        n, bwd_unit, _ = _sum_stats(model, "backward")
        bwd_n.append(n)
    peak: float | None = None
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    elif base is not None:
        now = _rss_bytes()
        peak = float(now - base) if now is not None else None
    return {
        "family": spec.family,
        "model": name,
        "preset": use_preset or "-",
        "params": params,
        "fwd_ms": 1e3 * statistics.median(fwd_t),
        "fwd_bwd_ms": 1e3 * statistics.median(fb_t),
        "fwd_n": statistics.median(fwd_n),
        "fwd_unit": fwd_unit,
        "bwd_n": statistics.median(bwd_n),
        "bwd_unit": bwd_unit,
        "failed": max(failed),
        "peak_mib": None if peak is None else peak / 2**20,
    }


def _run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one model in a fresh process so its memory high-water mark is its own."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"worker for {name!r} failed (exit {proc.returncode}): {tail}")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or ref <= 0:
        return "n/a"
    return f"{value / ref:.2f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table; ratios are to the first measured pcDEQ row."""
    ref = next((r for r in rows if r.get("family") == "pcdeq" and "fwd_ms" in r), None)
    header = (
        "| family | model | preset | params | fwd ms | fwd+bwd ms | fwd iter/NFE | "
        "bwd iter/NFE | unconverged | peak MiB | fwd / pcDEQ | fwd+bwd / pcDEQ | mem / pcDEQ |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['model']} | {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['family']} | {r['model']} | {r['preset']} | {r['params']:,} "
            f"| {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} "
            f"| {r['fwd_n']:g} {r['fwd_unit']} | {r['bwd_n']:g} {r['bwd_unit']} "
            f"| {r['failed']} | {_fmt(r['peak_mib'], '.1f')} "
            f"| {_ratio(r['fwd_ms'], ref and ref['fwd_ms'])} "
            f"| {_ratio(r['fwd_bwd_ms'], ref and ref['fwd_bwd_ms'])} "
            f"| {_ratio(r['peak_mib'], ref and ref['peak_mib'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument(
        "--preset",
        default="small",
        help="model preset applied where the model has it ('none' for the factory default)",
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated model names (default: one per family)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (faster; CPU peak memory is then n/a)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch < 2:  # BatchNorm in train mode needs two samples
        parser.error(f"--batch must be >= 2, got {args.batch}")
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        available = list_models()
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            parser.error(f"unknown model(s) {unknown or names}; available: {', '.join(available)}")
        args.models = names
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison, print the Markdown table and return its rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = None if args.preset.lower() == "none" else args.preset
    if args.worker is not None:
        row = measure(
            args.worker,
            preset=preset,
            batch=args.batch,
            repeats=args.repeats,
            device=device,
            seed=args.seed,
        )
        print(_RESULT_MARK + json.dumps(row))
        return [row]
    if args.models is not None:
        chosen = [(MODELS.get(n).family, n) for n in args.models]
    else:
        chosen = default_models()
    rows: list[dict[str, Any]] = []
    for family, name in chosen:
        if name is None:
            rows.append({"family": family, "model": PREFERRED[family], "error": "missing"})
            continue
        try:
            if args.in_process or device.type == "cuda":
                row = measure(
                    name,
                    preset=preset,
                    batch=args.batch,
                    repeats=args.repeats,
                    device=device,
                    seed=args.seed,
                    track_memory=False,
                )
            else:
                row = _run_worker(name, args)
        except Exception as exc:  # one broken model must not hide the others' numbers
            rows.append({"family": family, "model": name, "error": f"error: {exc}"})
            continue
        rows.append(row)
    memory = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else ("n/a (--in-process)" if args.in_process else "RSS high-water mark per worker")
    )
    print(
        f"# implicit-model families (preset {args.preset}, batch {args.batch}, "
        f"median of {args.repeats} runs; peak memory: {memory})"
    )
    print(machine_description(device))
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
