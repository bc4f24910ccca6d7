"""Timing helpers shared by the benchmark scripts in this folder (not part of the library).

The scripts import it as a sibling module (``from _timing import ...``): run as
``python benchmarks/bench_x.py`` the folder is on ``sys.path`` already, and a script loaded
by path (the tests) puts it there first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "INPUT_SHAPE",
    "NUM_CLASSES",
    "all_threads",
    "cpu_model",
    "machine_description",
    "median_time",
    "mnist_workload",
    "synchronize",
    "thread_settings",
    "timed",
]

#: the benchmarks measure MNIST-sized classifiers
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median of ``repeats`` timed calls of ``fn``."""
    return statistics.median(timed(fn, device) for _ in range(repeats))


def all_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_settings(text: str) -> list[int]:
    """``--threads`` values such as ``1,all``: distinct counts, ``all`` = :func:`all_threads`."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            values.append(all_threads())
        elif part.isdigit() and int(part) >= 1:
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"threads must be integers >= 1 or 'all', got {part!r}"
            )
    return list(dict.fromkeys(values))  # 'all' may equal a number given too


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux) and its bf16 matrix features."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's entries
    except OSError:  # not Linux: the platform's name is all there is
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    features = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return name + (f" ({', '.join(features)})" if features else "")


def machine_description(device: torch.device) -> str:
    """One line naming the machine the numbers come from."""
    return (
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", os.cpu_count()={os.cpu_count()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, device {device}, "
        f"python {platform.python_version()}"
    )


def mnist_workload(
    model: torch.nn.Module, batch: int, device: torch.device
) -> tuple[torch.Tensor, Callable[[], None], Callable[[], None]]:
    """``(x, forward, forward_backward)``: one random nonnegative MNIST-sized batch and closures.

    ``forward`` runs without a graph (what evaluation costs); ``forward_backward`` is one
    training step's worth of work (cross-entropy loss and its backward, no optimizer step).
    """
    x = torch.rand(batch, *INPUT_SHAPE, device=device)  # nonnegative images
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return x, forward, forward_backward
