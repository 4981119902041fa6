"""Real image data for the demo and the benchmarks, written out as class-incremental image folders.

numpy + Pillow + stdlib only (no torch), so a device-like process can run it.

Source (installs offline): Fashion-MNIST (Xiao et al. 2017), idx-format ``*-ubyte.gz`` files from
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). The benchmarks'
own data (B1's task groups, the scikit-learn digits that measure retention) is built in
benchmarks/b1_b6_accuracy/ from these writers.

Layout written by :func:`write_fashion_groups` (the torchvision ImageFolder convention that
``edgecl.formats.images`` reads)::

    ROOT/<group>/<split>/<class name>/<n>.png     split in {train, val, test}; class names like 0-tshirt
    ROOT/dataset.json                              what was written (the request and counts)

A group is a set of classes: ``calib`` / ``device-a`` / ``device-b`` for the demo, or ``task-1`` ..
``task-5`` for B1's 5 x 2 class-incremental stream. Each class's subsample is drawn from a
generator seeded by (seed, class id), so a class gets the same images whichever group holds it.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgecl.errors import DataError
from edgecl.formats.atomic import atomic_dir, atomic_write_json

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Class folder names: "<label>-<name>", so sorted folder order equals label order.
FASHION_CLASSES = ("0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat",
                   "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-ankle-boot")
SEED = 1993                      # the seed of the reference configs (docs/benchmarks.md#b1)
SPLITS = ("train", "val", "test")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}
_MISSING_FIX = ("install it: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, offline data), "
                "or pass the folder holding the *-ubyte.gz files")


# -- readers ---------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Decode an idx file (LeCun's MNIST format, gzip or plain) to a numpy array."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found", _MISSING_FIX) from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path} ({exc})", "re-install dataset-fashion-mnist") from exc
    # Header: two zero bytes, a dtype code, the number of dimensions, then big-endian int32 sizes.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file", "re-install dataset-fashion-mnist")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path} is truncated ({len(body)} bytes for shape {shape})",
                        "re-install dataset-fashion-mnist")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" (60 000) or "test" (10 000) split."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}", "use 'train' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found at {root}", _MISSING_FIX)
    image_file, label_file = _FILES[split]
    images = read_idx(root / image_file)
    labels = read_idx(root / label_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(f"Fashion-MNIST {split} files in {root} disagree ({images.shape} vs {labels.shape})",
                        "re-install dataset-fashion-mnist")
    return images, labels


# -- splits ----------------------------------------------------------------------------------------
def per_class_subsample(labels: np.ndarray, class_id: int, counts: Sequence[int], seed: int = SEED) -> list[np.ndarray]:
    """Disjoint index sets of sizes ``counts`` among the rows of ``class_id``, fixed by (seed, class_id)."""
    rows = np.flatnonzero(labels == class_id)
    need = int(sum(counts))
    if need > rows.size:
        raise DataError(f"class {class_id} has {rows.size} images, {need} were asked for",
                        "ask for fewer images per class")
    # One generator per class: a class's images do not depend on which other classes are written.
    perm = np.random.default_rng([seed, class_id]).permutation(rows)
    out, start = [], 0
    for n in counts:
        out.append(np.sort(perm[start:start + int(n)]))
        start += int(n)
    return out


# -- writers ---------------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W] (grayscale) or [H, W, 3] -> PNG bytes (lossless, so the pixels survive exactly)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       rows: np.ndarray | None = None, overwrite: bool = False) -> dict[str, int]:
    """Write ``root/<class name>/<row>.png`` for ``rows`` (default: all) atomically: whole or not at all.

    The file name is the row in ``images`` (zero-padded), so provenance survives and files sort in row
    order. Returns images per class.
    """
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    counts: dict[str, int] = {}
    with atomic_dir(root, overwrite=overwrite) as tmp:
        for row in rows.tolist():
            name = class_names[int(labels[row])]
            (tmp / name).mkdir(exist_ok=True)
            (tmp / name / f"{row:05d}.png").write_bytes(png_bytes(images[row]))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class FolderRequest:
    groups: dict[str, list[int]]      # group name -> class ids
    train_per_class: int              # images per class in <group>/train
    val_per_class: int                # held-out images per class for hyper-parameter choice (from train file)
    test_per_class: int               # images per class in <group>/test (from the test file)
    seed: int                         # subsample seed
    source: str                       # where the idx files came from


def write_fashion_groups(out: str | Path, groups: Mapping[str, Sequence[int]], train_per_class: int = 300,
                         test_per_class: int = 200, val_per_class: int = 0, seed: int = SEED,
                         source: str | Path = FASHION_MNIST_DIR, overwrite: bool = False) -> Path:
    """Write Fashion-MNIST groups of classes as image folders under ``out`` (see the module docstring).

    Reuses ``out`` when its ``dataset.json`` records the same request (reruns cost nothing); otherwise
    refuses unless ``overwrite``. Val images come from the train file, disjoint from the train images.
    """
    out = Path(out)
    request = FolderRequest({g: [int(c) for c in cs] for g, cs in groups.items()}, train_per_class,
                            val_per_class, test_per_class, seed, str(source))
    stamp = out / "dataset.json"
    if stamp.is_file():
        try:
            previous = json.loads(stamp.read_text()).get("request")
        except ValueError:
            previous = None
        if previous == asdict(request):
            return out
        if not overwrite:
            raise DataError(f"{out} holds a different dataset", "pass overwrite=True (--overwrite) or another folder")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not an edgecl dataset folder", "choose an empty or new folder")
    train_x, train_y = load_fashion_mnist("train", source)
    test_x, test_y = load_fashion_mnist("test", source)
    written: dict[str, dict[str, dict[str, int]]] = {}
    for group, class_ids in request.groups.items():
        sel: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for c in class_ids:
            train_rows, val_rows = per_class_subsample(train_y, c, [train_per_class, val_per_class], seed)
            (test_rows,) = per_class_subsample(test_y, c, [test_per_class], seed)
            sel["train"].append(train_rows)
            sel["val"].append(val_rows)
            sel["test"].append(test_rows)
        written[group] = {}
        for split in SPLITS:
            rows = np.concatenate(sel[split]) if sel[split] else np.zeros(0, np.int64)
            if rows.size == 0:
                continue
            x, y = (test_x, test_y) if split == "test" else (train_x, train_y)
            written[group][split] = write_image_folder(out / group / split, x, y, FASHION_CLASSES, rows,
                                                         overwrite=True)
    atomic_write_json(stamp, {"dataset": "fashion-mnist", "request": asdict(request), "written": written})
    return out


# Short class names for `edgecl data fashion-mnist` (the folder names a user sees), in label order.
FASHION_SHORT_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle-boot")
FOLDER_SPLITS = {"train": "train", "heldout": "test"}   # our split name -> the Fashion-MNIST file it is drawn from


def fashion_class_ids(names: Sequence[str]) -> list[int]:
    """Class ids of ``names``: short names (``dress``), folder names (``3-dress``) or label digits (``3``)."""
    ids = []
    for name in names:
        key = name.strip().lower()
        if key in FASHION_SHORT_NAMES:
            ids.append(FASHION_SHORT_NAMES.index(key))
        elif key in FASHION_CLASSES:
            ids.append(FASHION_CLASSES.index(key))
        elif key.isdigit() and int(key) < len(FASHION_CLASSES):
            ids.append(int(key))
        else:
            raise DataError(f"{name!r} is not a Fashion-MNIST class", f"use some of {', '.join(FASHION_SHORT_NAMES)}")
    if len(set(ids)) != len(ids):
        raise DataError(f"a class is named twice in {', '.join(names)}", "name each class once")
    return ids


def write_fashion_folder(out: str | Path, class_ids: Sequence[int], per_class: int, split: str = "train",
                         seed: int = SEED, source: str | Path = FASHION_MNIST_DIR, overwrite: bool = False
                         ) -> dict[str, int]:
    """One image folder ``out/<short class name>/<row>.png`` of ``per_class`` Fashion-MNIST images per class.

    ``split`` "train" draws from the training file, "heldout" from the test file: held-out images are
    never among any "train" folder's, whatever the seed. Written atomically; returns images per class.
    """
    if split not in FOLDER_SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of {', '.join(FOLDER_SPLITS)}")
    if per_class < 1:
        raise DataError(f"--per-class {per_class} is less than 1", "pass --per-class 1 or more")
    if not class_ids:
        raise DataError("no class given", f"pass --classes with some of {', '.join(FASHION_SHORT_NAMES)}")
    if Path(out).exists() and not overwrite:
        raise DataError(f"{out} already exists", "pass --overwrite or choose another folder")
    images, labels = load_fashion_mnist(FOLDER_SPLITS[split], source)
    rows = np.concatenate([per_class_subsample(labels, c, [per_class], seed)[0] for c in class_ids])
    return write_image_folder(out, images, labels, FASHION_SHORT_NAMES, rows, overwrite=overwrite)


# The demo's fleet (and B2-B4's data): the classes the model "had before" and two devices' new ones.
DEMO_GROUPS = {"calib": [0, 1, 2, 3, 4, 5], "device-a": [6, 7], "device-b": [8, 9]}


def write_synthetic_classes(root: str | Path, names: Sequence[str], per_class: int, seed: int = 0,
                            size: int = 40) -> Path:
    """PNG folders ROOT/<name>/NNN.png whose class is visible: a dominant colour channel plus a stripe.

    Real image files for tests and checks (tests/conftest.py, scripts/aarch64/check.py) that need
    learnable classes without a data set.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += 150
            img[(c * 7) % size:(c * 7) % size + 5, :, :] = 255 - 40 * c
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root
