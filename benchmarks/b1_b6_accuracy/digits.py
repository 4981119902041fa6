"""The never-trained source-proxy task that measures retention in B1 / B6 (docs/benchmarks.md#b1): the
8x8 handwritten digits that ship inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``), read
as a file, never imported, and written as image folders with edgecl.datasets' writers.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

from edgecl.datasets import SEED, per_class_subsample, write_image_folder
from edgecl.errors import DataError
from edgecl.formats.atomic import atomic_write_json

DIGIT_CLASSES = tuple(f"digit-{d}" for d in range(10))


def _sklearn_digits_file() -> Path:
    # Located, not imported: importing scikit-learn costs seconds and pulls scipy.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("scikit-learn is not installed (its digits are the source-proxy task)",
                        "pip install scikit-learn (or pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file {path} is missing", "re-install scikit-learn")
    return path


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: (images uint8 [N, 8, 8] scaled 0..16 -> 0..255, labels [N])."""
    with gzip.open(_sklearn_digits_file(), "rt") as f:
        rows = np.array([[int(v) for v in row] for row in csv.reader(f) if row], dtype=np.int64)
    values, labels = rows[:, :64], rows[:, 64]
    images = np.round(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8).reshape(-1, 8, 8)
    return images, labels


def write_digits_proxy(out: str | Path, train_fraction: float = 0.5, seed: int = SEED,
                       overwrite: bool = False) -> Path:
    """The never-trained source-proxy task: ``out/{train,test}/digit-<d>/<n>.png`` (8x8 grayscale PNGs).

    Prototypes come from ``train``, accuracy from ``test``; a per-class seeded split.
    """
    out = Path(out)
    request = {"train_fraction": train_fraction, "seed": seed}
    stamp = out / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("request") == request:
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and holds a different dataset", "pass overwrite=True or another folder")
    images, labels = load_digits()
    train_rows, test_rows = [], []
    for c in range(10):
        n = int(np.sum(labels == c))
        n_train = int(round(n * train_fraction))
        tr, te = per_class_subsample(labels, c, [n_train, n - n_train], seed)
        train_rows.append(tr)
        test_rows.append(te)
    written = {
        "train": write_image_folder(out / "train", images, labels, DIGIT_CLASSES, np.concatenate(train_rows), True),
        "test": write_image_folder(out / "test", images, labels, DIGIT_CLASSES, np.concatenate(test_rows), True),
    }
    atomic_write_json(stamp, {"dataset": "sklearn-digits", "request": request, "written": written})
    return out
