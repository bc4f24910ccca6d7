"""Where and how a run executes: device, seeds, determinism, mixed precision, DDP, memory."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pcdeq_plugin.checks import check_choice

from .config import DEVICES, ConfigError

__all__ = [
    "STOP_SIGNALS",
    "DistContext",
    "RunInterrupted",
    "StopFlag",
    "autocast",
    "get_rng_state",
    "init_distributed",
    "make_grad_scaler",
    "peak_memory",
    "reset_peak_memory",
    "select_device",
    "seed_everything",
    "set_deterministic",
    "set_rng_state",
    "sigterm_as_interrupt",
]


def select_device(name: str) -> torch.device:
    """Resolve ``auto | cuda | mps | cpu`` to a usable device, or say why it is unusable."""
    if name == "auto":
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "current_accelerator"):
            # check_available=True matters: without it a CUDA build on a machine without
            # a GPU reports "cuda" although torch.cuda.is_available() is False.
            found = accelerator.current_accelerator(check_available=True)
            if found is not None and found.type in ("cuda", "mps"):
                return select_device(found.type)
            return torch.device("cpu")
        if torch.cuda.is_available():
            return select_device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto"
            )
        # one GPU per torchrun process (LOCAL_RANK); cuda:0 when single-process
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps":
        if not (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        ):
            raise ConfigError(
                "device 'mps' requested but MPS is not available; use --device cpu or auto"
            )
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    check_choice("device", name, DEVICES, error=ConfigError)
    raise AssertionError(f"device {name!r} is in DEVICES but has no branch here")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (errors on ops that have none) and no cuDNN autotuning."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled


def get_rng_state() -> dict[str, Any]:
    """All RNG states as plain data that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy arrays are not allowed by the weights-only unpickler: store a list
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` saved."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str, device: torch.device) -> None:
    """Refuse combinations that cannot work, before any work is done."""
    if mode == "fp16" and device.type == "cpu":
        raise ConfigError("amp 'fp16' is not supported on CPU; use --amp bf16 or off")


@contextlib.contextmanager
def autocast(mode: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for ``bf16``/``fp16``; nothing for ``off``."""
    if mode == "off":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[mode]):
        yield


def make_grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler only where fp16 needs one (CUDA); bf16 has float32's range."""
    if mode == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a list of floats over ranks (identity when single-process)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``WORLD_SIZE > 1`` means DDP: NCCL when the run uses CUDA, gloo otherwise. On CPU each
    rank uses one thread, so ``N`` ranks do not oversubscribe the cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, True)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what the number is.

    CUDA: ``max_memory_allocated`` since the last reset (``"cuda_max_allocated"``).
    MPS: memory the driver holds now (``"mps_driver_allocated"``; MPS keeps no peak).
    CPU: the process's resident-set high-water mark since it started (``"cpu_rss_high_water"``),
    which includes Python and torch themselves.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "mps_driver_allocated"
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return float("nan"), "unavailable"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    mib = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10
    return mib, "cpu_rss_high_water"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a kill).

    A ``KeyboardInterrupt``, so every handler of Ctrl-C handles both; ``signal_name`` says
    which one arrived and :attr:`exit_code` is the shell's ``128 + signal number``.
    """

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


#: The signals that ask a run to stop and save a resumable checkpoint.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """The first SIGINT or SIGTERM asks the loop to stop at the next batch boundary (it then
    saves a resumable checkpoint); a second one aborts at once, keeping the previous one."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGINT"

    def interrupt(self) -> RunInterrupted:
        """The exception to raise at the batch boundary."""
        return RunInterrupted(self.signal_name)

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.requested:
                raise RunInterrupted(name)
            self.requested, self.signal_name = True, name

        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the path of Ctrl-C (a :class:`RunInterrupted`) outside the training
    loop too (setup, evaluation of a checkpoint, between the runs of a compare worker);
    inside the loop :class:`StopFlag` turns either into a stop at the next batch boundary."""

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
