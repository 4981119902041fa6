"""edgecl.datasets: idx decoding, seeded subsamples, image-folder layout, the digits source proxy.

Fast: hand-made idx files in tmp_path, plus read-only checks on the installed real files when present.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecl import datasets
from edgecl.errors import DataError
from edgecl.formats.images import load_image_folder


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(array.dtype.newbyteorder(">")).tobytes()))


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped source: 12 train / 5 test images per class, pixel values encode the row."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("test", 5)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        image_file, label_file = datasets._FILES[split]
        _write_idx(root / image_file, images)
        _write_idx(root / label_file, labels)
    return root


def test_read_idx_round_trips_and_rejects_damage(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 7
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), array)

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04junk"))
    with pytest.raises(DataError, match="not an idx file"):
        datasets.read_idx(tmp_path / "bad.gz")
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-4]))
    with pytest.raises(DataError, match="truncated"):
        datasets.read_idx(tmp_path / "short.gz")


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist("train", tmp_path)  # folder exists, files do not


def test_subsample_is_seeded_disjoint_and_per_class() -> None:
    labels = np.random.default_rng(1).integers(0, 3, size=300)
    a_train, a_val = datasets.per_class_subsample(labels, 1, [20, 10], seed=5)
    b_train, b_val = datasets.per_class_subsample(labels, 1, [20, 10], seed=5)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_val, b_val)
    assert np.all(labels[a_train] == 1) and np.all(labels[a_val] == 1)
    assert not set(a_train) & set(a_val)
    other_seed, _ = datasets.per_class_subsample(labels, 1, [20, 10], seed=6)
    assert not np.array_equal(a_train, other_seed)
    with pytest.raises(DataError, match="asked for"):
        datasets.per_class_subsample(labels, 1, [1000])


def test_write_groups_layout_pixels_and_reuse(tmp_path: Path, fake_fashion: Path) -> None:
    out = tmp_path / "data"
    groups = {"calib": [0, 1, 2], "device-a": [7]}
    datasets.write_fashion_groups(out, groups, train_per_class=4, val_per_class=3, test_per_class=2,
                                  seed=11, source=fake_fashion)
    assert sorted(p.name for p in (out / "calib" / "train").iterdir()) == ["0-tshirt", "1-trouser", "2-pullover"]
    assert [p.name for p in (out / "device-a" / "val").iterdir()] == ["7-sneaker"]
    assert len(list((out / "device-a" / "test" / "7-sneaker").glob("*.png"))) == 2

    # Every PNG holds exactly the source pixels of the row its name gives, under the right class.
    train_x, train_y = datasets.load_fashion_mnist("train", fake_fashion)
    for png in (out / "calib" / "train").rglob("*.png"):
        row = int(png.stem)
        assert datasets.FASHION_CLASSES[train_y[row]] == png.parent.name
        np.testing.assert_array_equal(np.asarray(Image.open(png)), train_x[row])
    train_rows = {p.stem for p in (out / "calib" / "train").rglob("*.png")}
    val_rows = {p.stem for p in (out / "calib" / "val").rglob("*.png")}
    assert len(train_rows) == 12 and len(val_rows) == 9 and not train_rows & val_rows

    # The shared image-folder reader sees it as a class folder, grayscale replicated to RGB.
    loaded = load_image_folder(out / "calib" / "test", size=(16, 16))
    assert loaded.classes == ["0-tshirt", "1-trouser", "2-pullover"]
    assert loaded.pixels.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(loaded.pixels[..., 0], loaded.pixels[..., 2])

    stamp = json.loads((out / "dataset.json").read_text())
    assert stamp["written"]["calib"]["train"] == {"0-tshirt": 4, "1-trouser": 4, "2-pullover": 4}

    # Same request: reused untouched. A class gets the same images whichever group holds it.
    before = (out / "calib" / "train" / "0-tshirt").stat().st_mtime_ns
    datasets.write_fashion_groups(out, groups, train_per_class=4, val_per_class=3, test_per_class=2,
                                  seed=11, source=fake_fashion)
    assert (out / "calib" / "train" / "0-tshirt").stat().st_mtime_ns == before
    other = tmp_path / "other"
    datasets.write_fashion_groups(other, {"x": [2]}, train_per_class=4, val_per_class=3, test_per_class=2,
                                  seed=11, source=fake_fashion)
    assert ({p.name for p in (other / "x" / "train" / "2-pullover").iterdir()}
            == {p.name for p in (out / "calib" / "train" / "2-pullover").iterdir()})

    # A different request on the same folder is refused, not silently mixed.
    with pytest.raises(DataError, match="different dataset"):
        datasets.write_fashion_groups(out, groups, train_per_class=5, source=fake_fashion)


def test_too_many_images_per_class_is_a_clear_error(tmp_path: Path, fake_fashion: Path) -> None:
    with pytest.raises(DataError, match="asked for"):
        datasets.write_fashion_groups(tmp_path / "d", {"g": [0]}, train_per_class=50, source=fake_fashion)
    assert not (tmp_path / "d" / "g").exists()


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_labels() -> None:
    labels = datasets.read_idx(datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
