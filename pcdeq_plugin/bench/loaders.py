"""DataLoaders whose order depends only on (seed, epoch), so a run can resume mid-epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .config import TrainConfig
from .runtime import DistContext

__all__ = ["test_loader", "train_loader"]


class _SkipSampler(Sampler[int]):
    """The wrapped sampler's order without its first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def train_loader(
    dataset: Dataset,
    config: TrainConfig,
    ctx: DistContext,
    epoch: int,
    skip_batches: int,
    pin: bool,
) -> DataLoader:
    # DistributedSampler also when single-process: one code path, and the data order of
    # epoch e depends only on (seed, e), which is what makes resume exact.
    sampler = DistributedSampler(
        dataset,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    # A final batch of one sample cannot be trained through BatchNorm (pcDEQ, the
    # unconstrained DEQ and SubDEQ all use it): drop exactly that case, nothing else.
    single_sample_tail = len(sampler) % config.batch_size == 1
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=_SkipSampler(sampler, skip_batches * config.batch_size),
        num_workers=config.workers,
        pin_memory=pin,
        generator=generator,
        drop_last=single_sample_tail,
    )


def test_loader(dataset: Dataset, config: TrainConfig, ctx: DistContext, pin: bool) -> DataLoader:
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=config.test_batch_size or config.batch_size,
        sampler=shard,
        num_workers=config.workers,
        pin_memory=pin,
    )
