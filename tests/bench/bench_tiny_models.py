"""Tiny implicit models for the harness tests, added as a plugin module by import path.

``bench-tiny-deq``: a contractive DEQ z = tanh(W z / (1 + ||W||) + U x) solved by plain
iteration, one-step gradient, statistics in the common interface. ``bench-crash``: raises
in forward (a model that crashes). Both are registered through the ``pcdeq`` hooks.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

import torch
from torch import nn

from pcdeq_plugin import BlockStats, ImplicitBlock, ImplicitModel, ModelSpec, SolveStats, hookimpl

INSTANCES: list[nn.Module] = []  # every TinyDEQ built in this process (DDP test inspects it)


def _dump_last_model() -> None:
    """With BENCH_TINY_DUMP set, save this process's last model as rank<RANK>.pt at exit,
    so a test can compare the weights each DDP rank ended with."""
    target = os.environ.get("BENCH_TINY_DUMP")
    if target and INSTANCES:
        rank = os.environ.get("RANK", "0")
        torch.save(INSTANCES[-1].state_dict(), Path(target) / f"rank{rank}.pt")


atexit.register(_dump_last_model)


class _TinyBlock(ImplicitBlock):
    def __init__(self, width: int, max_iter: int = 30, tol: float = 1e-4) -> None:
        super().__init__("tiny")
        self.weight = nn.Parameter(torch.randn(width, width) / width)
        self.max_iter, self.tol = max_iter, tol
        self.steps_seen = 0

    def _f(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        scale = 0.5 / (1.0 + self.weight.norm())
        return torch.tanh(z @ (scale * self.weight).T + u)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        tick = time.perf_counter()
        z = torch.zeros_like(u)
        iterations = 0
        with torch.no_grad():
            for iterations in range(1, self.max_iter + 1):  # noqa: B007
                nxt = self._f(z, u)
                residual = (nxt - z).norm(dim=1) / (nxt.norm(dim=1) + 1e-8)
                z = nxt
                if bool((residual < self.tol).all()):
                    break
        forward = SolveStats(
            iterations, residual, residual < self.tol, time.perf_counter() - tick, solver="tiny"
        )
        self.last_stats = BlockStats(self.block_name, forward=forward)
        z = self._f(z, u)  # one differentiable step
        if z.requires_grad:

            def record(grad: torch.Tensor) -> torch.Tensor:
                ones = torch.ones(grad.shape[0], dtype=torch.bool)
                self.last_stats.backward = SolveStats(
                    1, torch.zeros(grad.shape[0]), ones, 0.0, solver="tiny"
                )
                return grad

            z.register_hook(record)
        return z

    def after_optimizer_step(self) -> None:
        self.steps_seen += 1


class TinyDEQ(ImplicitModel):
    family = "tiny"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        self.inject = nn.Linear(c * h * w, width)
        self.block = _TinyBlock(width)
        # dropout draws from the global RNG at every training step: with it, an exact
        # resume needs the RNG state restored, not only the weights and the data order
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)
        INSTANCES.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _hold_while_asked(self.training)
        return self.head(self.drop(self.block(self.inject(x.flatten(1)))))


def _hold_while_asked(training: bool) -> None:
    """With BENCH_TINY_HOLD=PATH, training waits (up to 2 minutes) until PATH exists: a
    test can keep a run in the middle of its first epoch while it starts another one."""
    hold = os.environ.get("BENCH_TINY_HOLD")
    deadline = time.monotonic() + 120
    while training and hold and not Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class CrashModel(TinyDEQ):
    family = "tiny"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bench-crash always fails")


@hookimpl
def pcdeq_register_models() -> dict[str, ModelSpec]:
    return {
        "bench-tiny-deq": ModelSpec(
            "bench-tiny-deq",
            TinyDEQ,
            "tiny",
            "test model",
            presets={"small": {"width": 8}},
            training={"lr": 1e-3, "batch_size": 32},
        ),
        "bench-crash": ModelSpec(
            "bench-crash", CrashModel, "tiny", "always crashes", presets={"small": {}}
        ),
    }


def _blobs(split: str, *, data_dir: str, download: bool, augment: bool):
    """Two Gaussian blobs as 1x4x4 'images': the harness's dataset factory contract."""
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 1, 4, 4, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1) * 2.0
    return TensorDataset(images, labels)


@hookimpl
def pcdeq_register_datasets():
    from pcdeq_plugin import DatasetSpec

    return {
        "bench-blobs": DatasetSpec("bench-blobs", _blobs, (1, 4, 4), 2, "two blobs (test plugin)")
    }
