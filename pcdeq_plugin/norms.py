"""The conv backbones' BatchNorm, laid out where the CPU kernel is fast.

:class:`LayoutBatchNorm2d` is ``nn.BatchNorm2d``. Under the ``"auto"`` layout it computes
batch statistics (training) of a channels-last CPU batch with fewer than 16 channels in
NCHW when PyTorch runs on more than one thread, and hands the result back channels-last:
PyTorch's channels-last kernel then has no full AVX-512 float vector of channels to work
on and gets slower, not faster, with a second thread (``benchmarks/bench_kernels.py
--sections batchnorm``, batch 64, 12 channels at 28x28, two threads: forward 2.5 and
backward 5.4 ms channels-last, against 0.73 and 0.40 ms in NCHW; one thread: 1.9 and 2.8
against 2.1 and 0.8 ms, where the four layout copies eat the gain). The multi-conv nets'
first stage has 12 channels: in a two-thread training step of ``pcdeq-multi-conv-1``
(batch 64) its BatchNorms and their layout copies take 10.3 ms instead of 17.3 ms
(``bench_kernels.py --threads 1,all --repeats 20 --sections stage``: profiler self
time, at initialisation), 5-7% of the step -- less than this machine's run-to-run
noise end to end. Everywhere else, and with running statistics (evaluation) always, it is
``nn.BatchNorm2d`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_flag

__all__ = ["LayoutBatchNorm2d", "NCHW_BELOW_CHANNELS"]

#: Fewer channels than one AVX-512 vector of floats: the channels-last kernel's slow case.
NCHW_BELOW_CHANNELS = 16


class LayoutBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises small-channel CPU batches in NCHW where that is faster.

    Args:
        num_features: Channels.
        auto_layout: Whether the layout may be switched (the backbone's ``"auto"``); a
            forced layout keeps every BatchNorm in it.
        **kwargs: ``nn.BatchNorm2d``'s.

    Raises:
        ArgumentError: ``auto_layout`` is not a bool.
    """

    def __init__(self, num_features: int, *, auto_layout: bool = True, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.auto_layout = bool(check_flag("auto_layout", auto_layout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_nchw(x):
            out = super().forward(x.contiguous())
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    def _uses_nchw(self, x: torch.Tensor) -> bool:
        batch_statistics = self.training or self.running_mean is None
        return (
            self.auto_layout
            and batch_statistics
            and self.num_features < NCHW_BELOW_CHANNELS
            and x.device.type == "cpu"
            and x.dim() == 4
            and torch.get_num_threads() > 1
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.auto_layout else ", auto_layout=False")
