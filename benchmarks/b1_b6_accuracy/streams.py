"""The B1 and B6 image streams as arrays: Fashion-MNIST tasks (B1: new classes; B6: new cameras) and the
never-trained source proxy (scikit-learn's digits) that measures retention.

Each stream is written once as image folders under benchmarks/out/data/ (the CLI path of the edgecl
learner reads the folders) and loaded back resized to the model's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.b1_b6_accuracy.digits import write_digits_proxy
from benchmarks.b1_b6_accuracy.domains import DOMAINS, domain_dir, write_domain_stream
from benchmarks.shared import common
from edgecl.datasets import FASHION_CLASSES, SEED, write_fashion_groups
from edgecl.errors import DataError
from edgecl.formats.images import load_image_folder


# -- B1's task groups -----------------------------------------------------------------------------
def class_incremental_tasks(num_classes: int = 10, classes_per_task: int = 2,
                            order: Sequence[int] | None = None) -> list[list[int]]:
    """Class ids per task: the fixed order 0..C-1 cut into tasks (docs/benchmarks.md#b1: 5 x 2, order 0..9)."""
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)) or num_classes % classes_per_task:
        raise DataError(f"class order {order} does not split into tasks of {classes_per_task}",
                        "give a permutation of 0..C-1 and a task size that divides C")
    return [order[i:i + classes_per_task] for i in range(0, num_classes, classes_per_task)]


def fashion_task_groups(num_tasks: int = 5, classes_per_task: int = 2) -> dict[str, list[int]]:
    """The B1 stream as groups: ``task-1`` = [0, 1], ..., ``task-5`` = [8, 9]."""
    tasks = class_incremental_tasks(num_tasks * classes_per_task, classes_per_task)
    return {f"task-{t + 1}": classes for t, classes in enumerate(tasks)}


# -- splits and streams ----------------------------------------------------------------------------
@dataclass
class Split:
    pixels: np.ndarray   # [N, H, W, 3] uint8, resized to the model's input size
    labels: np.ndarray   # [N] int64 global class ids (Fashion-MNIST label, or digit)


@dataclass
class Task:
    name: str                        # task-<t> (B1) or domain-<d>-<camera> (B6)
    classes: list[int]               # the classes its images hold
    train: Split
    val: Split                       # held out from the train file, for hyper-parameters
    test: Split
    folder: Path                     # <folder>/{train,val,test}: the image folders the CLI path reads


@dataclass
class Stream:
    kind: str                        # "class" (B1: new classes per task) or "domain" (B6: new camera per task)
    tasks: list[Task]
    digits_train: Split              # the never-trained source proxy (retention)
    digits_test: Split


def _load(folder: Path, size: list[int], interpolation: str, names: tuple[str, ...] | None) -> Split:
    loaded = load_image_folder(folder, size, interpolation)
    if names is None:  # digits: class folder "digit-<d>"
        ids = [int(c.rsplit("-", 1)[1]) for c in loaded.classes]
    else:
        ids = [names.index(c) for c in loaded.classes]
    return Split(loaded.pixels, np.asarray(ids, np.int64)[loaded.labels])


def _task(name: str, folder: Path, size: list[int], interpolation: str) -> Task:
    splits = {s: _load(folder / s, size, interpolation, FASHION_CLASSES) for s in ("train", "val", "test")}
    return Task(name, sorted({int(c) for c in splits["train"].labels}), splits["train"], splits["val"],
                splits["test"], folder)


def _digits(size: list[int], interpolation: str, seed: int) -> tuple[Split, Split]:
    root = write_digits_proxy(common.DATA / f"digits-s{seed}", seed=seed)
    return _load(root / "train", size, interpolation, None), _load(root / "test", size, interpolation, None)


def b1_stream(size: list[int], train: int, val: int, test: int, seed: int = SEED,
              interpolation: str = "bilinear") -> Stream:
    """B1: Fashion-MNIST 5 tasks x 2 classes (order 0..9), a fixed per-class subsample."""
    groups = fashion_task_groups()
    root = write_fashion_groups(common.DATA / f"fashion-mnist-{train}-{val}-{test}-s{seed}", groups, train_per_class=train,
                                val_per_class=val, test_per_class=test, seed=seed)
    return Stream("class", [_task(g, root / g, size, interpolation) for g in groups], *_digits(size, interpolation, seed))


def b6_stream(size: list[int], train: int, val: int, test: int, seed: int = SEED,
              interpolation: str = "bilinear", domains: tuple[str, ...] | None = None) -> Stream:
    """B6: the same 10 classes through one camera after another (domains.py)."""
    names = tuple(domains or DOMAINS)
    root = write_domain_stream(common.DATA / f"fashion-domains-{train}-{val}-{test}-s{seed}", train, val, test, seed, names)
    return Stream("domain", [_task(domain_dir(d, n), root / domain_dir(d, n), size, interpolation)
                             for d, n in enumerate(names)], *_digits(size, interpolation, seed))


def concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.pixels for s in splits]), np.concatenate([s.labels for s in splits]))
