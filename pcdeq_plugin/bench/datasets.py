"""The harness's datasets, registered as ``DatasetSpec``s through the ``pcdeq`` hooks.

Factory contract (what a plugin's ``DatasetSpec.factory`` must accept)::

    factory(split, *, data_dir, download, augment) -> torch.utils.data.Dataset

``split`` is ``"train"`` or ``"test"``; items are ``(image [C, H, W] float tensor, int label)``.

Built here:

* ``mnist5k`` -- 5,000 real MNIST digits embedded in the package (offline default), split
  400/100 per class into 4,000 train / 1,000 test (see ``data_files/mnist5k.json``).
* ``mnist``, ``svhn``, ``cifar10`` -- torchvision, with the pcDEQ scripts' transforms
  (MNIST: ``ToTensor`` only; SVHN/CIFAR-10: per-channel normalisation).
* ``cifar10-aug`` -- CIFAR-10 with random crop (padding 4) and horizontal flip for training.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from pcdeq_plugin import DatasetSpec, hookimpl
from pcdeq_plugin.checks import check_choice
from pcdeq_plugin.registry import DATASETS

from .config import ConfigError

__all__ = [
    "CIFAR10_NORM",
    "DatasetNotFoundError",
    "SPLITS",
    "SVHN_NORM",
    "load_dataset",
    "load_mnist5k",
    "mnist5k_provenance",
]

SPLITS: tuple[str, ...] = ("train", "test")
# Normalisations of the pcDEQ training scripts (reference pcdeq.md section 2.7).
SVHN_NORM = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk; the message says how to get them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check_split(split: str) -> None:
    check_choice("split", split, SPLITS)


def _no_augmentation(name: str, augment: bool) -> None:
    if augment:
        raise ConfigError(
            f"dataset {name!r} has no training augmentation; --augment applies to cifar10 "
            "(or use the dataset cifar10-aug)"
        )


# -- mnist5k -------------------------------------------------------------------------------


def mnist5k_provenance() -> dict[str, Any]:
    """Source, licence, split and checksums of the embedded ``mnist5k`` file."""
    text = resources.files("pcdeq_plugin.bench").joinpath("data_files/mnist5k.json").read_text()
    return json.loads(text)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> dict[str, np.ndarray]:
    blob = resources.files("pcdeq_plugin.bench").joinpath("data_files/mnist5k.npz").read_bytes()
    expected = mnist5k_provenance()["file_sha256"]
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise RuntimeError(
            f"the embedded mnist5k.npz is damaged (sha256 {actual}, expected {expected}); "
            "reinstall pcdeq-plugin or regenerate it with scripts/make_mnist5k.py"
        )
    with np.load(io.BytesIO(blob)) as npz:
        return {key: npz[key] for key in npz.files}


def load_mnist5k(split: str, *, augment: bool = False, **_: Any) -> TensorDataset:
    """The embedded 5,000-digit MNIST subset as float images in [0, 1] (pcDEQ: no normalisation)."""
    _check_split(split)
    _no_augmentation("mnist5k", augment)
    arrays = _mnist5k_arrays()
    images = torch.from_numpy(arrays[f"{split}_images"]).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
    return TensorDataset(images, labels)


# -- torchvision ---------------------------------------------------------------------------


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:  # optional extra
        raise ImportError(
            "this dataset needs torchvision: pip install 'pcdeq-plugin[bench]'"
        ) from exc
    return torchvision


def _missing(name: str, root: Path, expected: list[Path], flag_hint: str) -> DatasetNotFoundError:
    absent = [str(p) for p in expected if not p.is_file()]
    return DatasetNotFoundError(
        f"dataset {name!r} not found under {root}: missing {', '.join(absent)}.\n"
        f"Either pass --download (with --data-dir {root}) to let torchvision fetch it, or point "
        f"--data-dir at a directory laid out as torchvision expects: {flag_hint}"
    )


def _open_torchvision(
    name: str, build: Callable[[], Dataset], root: Path, download: bool, layout: str
) -> Dataset:
    try:
        return build()
    except RuntimeError as exc:
        if "not found" in str(exc) or "corrupted" in str(exc):
            raise DatasetNotFoundError(
                f"dataset {name!r} under {root} is missing or fails torchvision's checksum "
                f"({exc}); delete the partial files and rerun with --download"
            ) from exc
        if not download:
            raise
        raise DatasetNotFoundError(
            f"downloading dataset {name!r} into {root} failed ({type(exc).__name__}: {exc}); "
            f"check the network, or place the files yourself as {layout}"
        ) from exc
    except OSError as exc:  # URLError and socket errors while downloading
        if not download:
            raise
        raise DatasetNotFoundError(
            f"downloading dataset {name!r} into {root} failed ({type(exc).__name__}: {exc}); "
            f"check the network, or place the files yourself as {layout}"
        ) from exc


def load_mnist(
    split: str, *, data_dir: str, download: bool = False, augment: bool = False, **_: Any
) -> Dataset:
    """torchvision MNIST with ``ToTensor`` only, as in the pcDEQ scripts."""
    _check_split(split)
    _no_augmentation("mnist", augment)
    tv = _torchvision()
    root = Path(data_dir)
    expected = [root / "MNIST" / "raw" / f for f in _MNIST_FILES]
    layout = "DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
    if not download and not all(p.is_file() for p in expected):
        raise _missing("mnist", root, expected, layout)
    transform = tv.transforms.ToTensor()
    return _open_torchvision(
        "mnist",
        lambda: tv.datasets.MNIST(
            str(root), train=split == "train", download=download, transform=transform
        ),
        root,
        download,
        layout,
    )


def load_svhn(
    split: str, *, data_dir: str, download: bool = False, augment: bool = False, **_: Any
) -> Dataset:
    """torchvision SVHN (train/test, no "extra") normalised as in the pcDEQ SVHN script."""
    _check_split(split)
    _no_augmentation("svhn", augment)
    tv = _torchvision()
    root = Path(data_dir)
    expected = [root / _SVHN_FILES[split]]
    layout = "DIR/train_32x32.mat and DIR/test_32x32.mat"
    if not download and not expected[0].is_file():
        raise _missing("svhn", root, expected, layout)
    t = tv.transforms
    transform = t.Compose([t.ToTensor(), t.Normalize(*SVHN_NORM)])
    return _open_torchvision(
        "svhn",
        lambda: tv.datasets.SVHN(str(root), split=split, download=download, transform=transform),
        root,
        download,
        layout,
    )


def load_cifar10(
    split: str, *, data_dir: str, download: bool = False, augment: bool = False, **_: Any
) -> Dataset:
    """torchvision CIFAR-10 normalised as in the pcDEQ script; ``augment`` adds crop + flip."""
    _check_split(split)
    tv = _torchvision()
    root = Path(data_dir)
    expected = [root / "cifar-10-batches-py" / f for f in _CIFAR_FILES]
    layout = "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"
    if not download and not all(p.is_file() for p in expected):
        raise _missing("cifar10", root, expected, layout)
    t = tv.transforms
    steps: list[Any] = []
    if augment and split == "train":
        steps += [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip()]
    steps += [t.ToTensor(), t.Normalize(*CIFAR10_NORM)]
    return _open_torchvision(
        "cifar10",
        lambda: tv.datasets.CIFAR10(
            str(root), train=split == "train", download=download, transform=t.Compose(steps)
        ),
        root,
        download,
        layout,
    )


def load_cifar10_aug(split: str, **options: Any) -> Dataset:
    options["augment"] = True
    return load_cifar10(split, **options)


@hookimpl
def pcdeq_register_datasets() -> dict[str, DatasetSpec]:
    specs = [
        DatasetSpec(
            "mnist5k",
            load_mnist5k,
            (1, 28, 28),
            10,
            "5,000 real MNIST digits embedded in the package (4,000 train / 1,000 test), offline",
        ),
        DatasetSpec(
            "mnist", load_mnist, (1, 28, 28), 10, "torchvision MNIST (60k/10k), ToTensor only"
        ),
        DatasetSpec("svhn", load_svhn, (3, 32, 32), 10, "torchvision SVHN train/test, normalised"),
        DatasetSpec("cifar10", load_cifar10, (3, 32, 32), 10, "torchvision CIFAR-10, normalised"),
        DatasetSpec(
            "cifar10-aug",
            load_cifar10_aug,
            (3, 32, 32),
            10,
            "CIFAR-10 with random crop (padding 4) and horizontal flip when training",
        ),
    ]
    return {spec.name: spec for spec in specs}


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed random subset, so a limit keeps every class (mnist5k is sorted by label)."""
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:limit]  # type: ignore[arg-type]
    return Subset(dataset, index.tolist())


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str = "./data",
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
    subset_seed: int = 0,
) -> Dataset:
    """Build a registered dataset's ``split`` (optionally a fixed subset of ``limit`` items).

    Raises:
        UnknownNameError: no dataset called ``name`` (the message lists them).
        DatasetNotFoundError: the files are not on disk and ``download`` is false.
    """
    spec = DATASETS.get(name)
    dataset = spec.factory(split, data_dir=data_dir, download=download, augment=augment)
    return _subset(dataset, limit, subset_seed)


def dataset_info(name: str) -> DatasetSpec:
    """The registered spec (input shape, class count) of dataset ``name``."""
    return DATASETS.get(name)
