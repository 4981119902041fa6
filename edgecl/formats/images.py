"""Image folders, decoding, preprocessing and the MI augmentations, in numpy + Pillow.

One implementation for host and device so both see exactly the same pixels. Layout: the
torchvision ImageFolder convention, ``ROOT/<class name>/<image file>``. Unreadable or corrupt
files are skipped and counted, never fatal; a folder with no readable image is a DataError.

Augmentations (docs/method.md#step-1, as in the reference): random resized crop (scale 0.3-1.0,
ratio 3/4-4/3), horizontal flip (p=0.5), random grayscale (p=0.25), each drawn from a numpy
Generator so a seed fixes the stream.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgecl.errors import DataError
from edgecl.formats.preprocess import RESAMPLE as _RESAMPLE
from edgecl.formats.preprocess import Preprocess, normalize, resize_rgb
from edgecl.progress import progress_bar

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "LoadedImages", "load_image_folder", "load_input", "load_rgb", "normalize",
           "random_view", "scan_image_folder", "two_views"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL's "L"


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]                      # sorted class folder names
    paths: list[Path]                       # image files (by suffix), class by class
    labels: np.ndarray                      # [N] int64 index into classes
    ignored: list[Path] = field(default_factory=list)  # files without an image suffix
    empty: list[Path] = field(default_factory=list)    # class folders without an image file


@dataclass
class LoadedImages:
    classes: list[str]
    pixels: np.ndarray                      # [N, H, W, 3] uint8, resized to the model's input size
    labels: np.ndarray                      # [N] int64
    paths: list[Path]                       # files that decoded, row order
    skipped: list[tuple[Path, str]]         # (file, reason) that did not decode


def scan_image_folder(root: str | Path) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "pass an image folder: ROOT/<class name>/<images>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        hint = " (images sit directly in it; put them in one sub-folder per class)" if loose else ""
        raise DataError(f"{root} has no class sub-folders{hint}", "lay it out as ROOT/<class name>/<images>")
    paths: list[Path] = []
    labels: list[int] = []
    ignored: list[Path] = []
    empty: list[Path] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored.extend(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
        if not images:
            empty.append(class_dir)
            continue
        labels.extend([len(classes)] * len(images))
        classes.append(class_dir.name)
        paths.extend(images)
    if not paths:
        raise DataError(f"{root} holds no image files", f"add images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                        "in one sub-folder per class")
    return ImageFolder(root, classes, paths, np.asarray(labels, np.int64), ignored, empty)


def _open_regular(path: str | Path):  # noqa: ANN202 - a binary file object
    """Open ``path`` for reading only if it is a regular file.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer (which would hang
    `edgecl predict` forever), and the type is checked on the opened descriptor, so a file swapped
    for a FIFO between a check and the open cannot slip through."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise DataError(f"{path} is {kind}, not an image file", "pass regular image files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _why(exc: BaseException) -> str:
    """The decoder's reason, the same for the same file: Pillow names an unidentified file by the file
    object it was given (``<_io.BufferedReader name=21>``, a descriptor number that changes run to run)."""
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format Pillow can identify"
    return f"{type(exc).__name__}: {exc}"


def load_rgb(path: str | Path, size: Iterable[int], interpolation: str = "bilinear") -> np.ndarray:
    """Decode one file to uint8 [H, W, 3], resized to ``size`` = (H, W). Raises DataError if unreadable."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            im.load()
            return resize_rgb(im, size, interpolation)
    except FileNotFoundError as exc:
        raise DataError(f"image {path} does not exist", "check the path") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path} ({_why(exc)})", "replace or remove the file") from exc


def load_input(path: str | Path, preprocess: Preprocess, out: np.ndarray) -> None:
    """Decode one file straight into the model's input row ``out`` [3, H, W] float32: bit for bit
    ``preprocess(load_rgb(path, ...)[None])[0]``, with no uint8 RGB copy on the way (`edgecl watch`).
    Raises DataError if unreadable (``out`` is then left partly written)."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            im.load()
            preprocess.write(im, out)
    except FileNotFoundError as exc:
        raise DataError(f"image {path} does not exist", "check the path") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path} ({_why(exc)})", "replace or remove the file") from exc


def load_image_folder(root: str | Path, size: Iterable[int], interpolation: str = "bilinear",
                      progress: bool = False, desc: str = "decode") -> LoadedImages:
    folder = scan_image_folder(root)
    if folder.empty:
        # Not silently: a class folder whose images did not arrive would otherwise just be missing.
        names = ", ".join(p.name for p in folder.empty)
        warnings.warn(f"class folder(s) without an image file in {folder.root}, not learned: {names} "
                      f"(add images to them or remove them)", stacklevel=2)
    size = tuple(int(s) for s in size)
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    ok_paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with progress_bar(len(folder.paths), desc, enabled=progress) as bar:
        for path, label in zip(folder.paths, folder.labels.tolist(), strict=True):
            bar.update(1)
            try:
                pixels.append(load_rgb(path, size, interpolation))
            except DataError as exc:
                skipped.append((path, exc.problem))
                continue
            labels.append(label)
            ok_paths.append(path)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {folder.root}, e.g. {skipped[0][0]}",
                      stacklevel=2)
    if not pixels:
        raise DataError(f"no image in {folder.root} could be decoded ({len(skipped)} unreadable)",
                        "check the files are real images")
    # Classes whose every file failed are dropped so labels stay dense.
    present = sorted(set(labels))
    remap = {old: new for new, old in enumerate(present)}
    return LoadedImages(classes=[folder.classes[i] for i in present],
                        pixels=np.stack(pixels),
                        labels=np.asarray([remap[x] for x in labels], np.int64),
                        paths=ok_paths, skipped=skipped)


def random_view(img: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] = (0.3, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), p_flip: float = 0.5, p_gray: float = 0.25,
                interpolation: str = "bilinear") -> np.ndarray:
    """One augmented view of a uint8 [H, W, 3] image, same size (torchvision's RandomResizedCrop rule)."""
    h, w = img.shape[:2]
    area = h * w
    box = (0, 0, w, h)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = np.asarray(Image.fromarray(img).resize((w, h), _RESAMPLE[interpolation], box=box))
    if rng.random() < p_flip:
        out = out[:, ::-1]
    if rng.random() < p_gray:
        gray = (out.astype(np.float32) @ _GRAY_WEIGHTS).round().clip(0, 255).astype(np.uint8)
        out = np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def two_views(pixels: np.ndarray, rng: np.random.Generator, mean: Iterable[float], std: Iterable[float],
              interpolation: str = "bilinear") -> np.ndarray:
    """Batch uint8 [B, H, W, 3] -> float32 [2B, 3, H, W]: rows 0..B-1 view 1, rows B..2B-1 view 2."""
    views = [random_view(img, rng, interpolation=interpolation) for img in pixels]
    views += [random_view(img, rng, interpolation=interpolation) for img in pixels]
    return normalize(np.stack(views), mean, std)
