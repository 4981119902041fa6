"""Shared fixtures: real image files on disk and tiny bundles exported by the real host path."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 40, seed: int = 0,
                       names: list[str] | None = None) -> Path:
    """PNG files whose class is visible (a dominant colour channel plus a class-specific stripe)."""
    from edgecl.datasets import write_synthetic_classes

    return write_synthetic_classes(root, names or [f"class{c}" for c in range(classes)], per_class, seed, size)


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> Path:
    """A test_efficientnet bundle exported through the real host path (read-only: copy before changing)."""
    from edgecl.host.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny_efficientnet"
    export_bundle(MODELS / "test_efficientnet.toml", calib_dir, out,
                  options=ExportOptions(batch_size=16, progress=False))
    return out


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny bundle."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
