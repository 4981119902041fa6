"""`edgecl data fashion-mnist`: the README quickstart's image folders, from a Fashion-MNIST-shaped source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_datasets import _write_idx
from typer.testing import CliRunner

from edgecl import datasets
from edgecl.cli.main import app

runner = CliRunner()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """12 train / 5 test images per class; the first pixel says which file an image came from."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class, mark in (("train", 12, 1), ("test", 5, 2)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(10, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = mark
        image_file, label_file = datasets._FILES[split]
        _write_idx(root / image_file, images)
        _write_idx(root / label_file, labels)
    return root


def _first_pixels(folder: Path) -> set[int]:
    from PIL import Image

    return {int(np.asarray(Image.open(p))[0, 0]) for p in folder.rglob("*.png")}


def test_train_and_heldout_folders_by_class_name(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib"
    done = runner.invoke(app, ["data", "fashion-mnist", str(out), "--classes", "tshirt,3-dress,9", "--per-class", "4",
                               "--source", str(source)])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0] == f"wrote {out}: 12 train images, 4 per class of ankle-boot, dress, tshirt"
    assert done.output.splitlines()[1].startswith(f"next: edgecl export RECIPE --data {out} -o bundle")
    assert sorted(p.name for p in out.iterdir()) == ["ankle-boot", "dress", "tshirt"]
    assert all(len(list((out / c).glob("*.png"))) == 4 for c in ("ankle-boot", "dress", "tshirt"))
    assert _first_pixels(out) == {1}, "train folders come from the training file"

    held = tmp_path / "heldout"
    done = runner.invoke(app, ["data", "fashion-mnist", str(held), "--classes", "tshirt,dress", "--per-class", "5",
                               "--split", "heldout", "--source", str(source)])
    assert done.exit_code == 0, done.output
    assert _first_pixels(held) == {2}, "held-out folders come from the test file: never among the train images"


def test_bad_requests_are_one_line_and_write_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    for args, said in ((["--classes", "tshirt,hat"], "'hat' is not a Fashion-MNIST class"),
                       (["--classes", "tshirt", "--per-class", "13"], "class 0 has 12 images, 13 were asked for"),
                       (["--classes", "tshirt", "--split", "val"], "unknown split 'val'"),
                       (["--classes", "tshirt,0"], "a class is named twice")):
        done = runner.invoke(app, ["data", "fashion-mnist", str(out), *args, "--source", str(source)])
        assert done.exit_code == 1 and said in done.output and len(done.output.splitlines()) == 1, done.output
        assert not out.exists()
    out.mkdir()
    done = runner.invoke(app, ["data", "fashion-mnist", str(out), "--classes", "tshirt", "--source", str(source),
                               "--per-class", "2"])
    assert done.exit_code == 1 and "already exists" in done.output
