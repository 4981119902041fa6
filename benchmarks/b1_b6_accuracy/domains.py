"""B6's cameras: fixed, seeded image-formation changes applied to Fashion-MNIST (numpy + Pillow only).

The factory's commonest change (docs/benchmarks.md#b6): the products stay, the camera, lighting or finish
changes. Each domain is one camera: a fixed setting (the same blur, gamma, tilt or polarity for every
image, as a real mount or lens change would be) plus what varies shot to shot on a real sensor
(noise, a little jitter), drawn from a generator seeded by (seed, domain, image row): an image gets the
same pixels whichever run, split or process writes it.

Images are rendered at the camera's resolution ``size`` (default 64 px, B6's model input), from the
28 x 28 grayscale original upsampled bilinearly, and saved losslessly as PNG (the JPEG domain's
artefacts are baked in before). The model then loads them resized to its own input size (identity
at 64 px).

Domains, in stream order:
1. ``clean``      - the original images (the camera the bundle was exported for);
2. ``blur-noise`` - a soft, defocused lens (Gaussian blur, sigma 1.2 px at 64 px) and a noisy sensor
                    (Gaussian read noise, sigma 10/255, plus shot noise growing with brightness);
3. ``dim-jpeg``   - low light and a cheap pipeline: gamma 1.8 (darker mid-tones), contrast 0.6,
                    a warm white balance (R x1.10, B x0.80), JPEG quality 20;
4. ``tilt-zoom``  - the camera remounted: rotated 12 degrees (+-3), zoomed out to 0.8 (+-0.05),
                    shifted up to 3 px, exposure +-15%;
5. ``inverted``   - dark-field / back-lit station: polarity inverted (dark product on a light
                    background), a slight blur (sigma 0.6 px).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

DOMAINS = ("clean", "blur-noise", "dim-jpeg", "tilt-zoom", "inverted")
DOMAIN_SIZE = 64  # px: the camera's resolution (B6's model input size)


@dataclass(frozen=True)
class Camera:
    name: str
    render: Callable[[np.ndarray, np.random.Generator, int], np.ndarray]  # gray uint8 [S, S] -> RGB uint8 [S, S, 3]


def _upsample(gray28: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray28).resize((size, size), Image.Resampling.BILINEAR), np.float32)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _blur(x: np.ndarray, sigma_px: float) -> np.ndarray:
    mode = "RGB" if x.ndim == 3 else "L"
    return np.asarray(Image.fromarray(_to_u8(x), mode).filter(ImageFilter.GaussianBlur(sigma_px)), np.float32)


def _clean(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return _to_u8(_rgb(x))


def _blur_noise(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    y = _blur(x, 1.2 * size / 64)
    read = rng.normal(0.0, 10.0, y.shape)
    shot = rng.normal(0.0, 1.0, y.shape) * np.sqrt(np.maximum(y, 0.0) * 0.5)  # photon noise ~ sqrt(signal)
    return _to_u8(_rgb(y + read + shot))


def _dim_jpeg(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    y = 255.0 * (x / 255.0) ** 1.8              # gamma: darker mid-tones
    y = 128.0 + 0.6 * (y - 128.0)               # low contrast
    rgb = _rgb(y) * np.array([1.10, 1.0, 0.80], np.float32)  # warm white balance
    buf = io.BytesIO()
    Image.fromarray(_to_u8(rgb)).save(buf, format="JPEG", quality=20)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _tilt_zoom(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    angle = 12.0 + rng.uniform(-3.0, 3.0)
    zoom = 0.8 + rng.uniform(-0.05, 0.05)
    shift = rng.uniform(-3.0, 3.0, 2) * size / 64
    # Inverse affine map (output -> input) about the centre: rotate by angle, scale by zoom, then shift.
    c = (size - 1) / 2.0
    a = np.deg2rad(angle)
    inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / zoom
    off = np.array([c, c]) - inv @ (np.array([c, c]) + shift)
    img = Image.fromarray(_to_u8(x)).transform((size, size), Image.Transform.AFFINE,
                                               (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                                               resample=Image.Resampling.BILINEAR, fillcolor=0)
    y = np.asarray(img, np.float32) * (1.0 + rng.uniform(-0.15, 0.15))
    return _to_u8(_rgb(y))


def _inverted(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return _to_u8(_rgb(_blur(255.0 - x, 0.6 * size / 64)))


CAMERAS = {c.name: c for c in (Camera("clean", _clean), Camera("blur-noise", _blur_noise),
                               Camera("dim-jpeg", _dim_jpeg), Camera("tilt-zoom", _tilt_zoom),
                               Camera("inverted", _inverted))}


def render(domain: str, gray28: np.ndarray, rows: Sequence[int], seed: int, size: int = DOMAIN_SIZE) -> np.ndarray:
    """Images ``gray28[rows]`` (uint8 [N, 28, 28]) as camera ``domain`` sees them: uint8 [len(rows), size, size, 3]."""
    camera = CAMERAS[domain]
    d = DOMAINS.index(domain)
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, d, int(row)])  # per image: same pixels in every process
        out[i] = camera.render(_upsample(gray28[int(row)], size), rng, size)
    return out


def write_domain_stream(out: Path, train_per_class: int, val_per_class: int, test_per_class: int,
                        seed: int, domains: Sequence[str] = DOMAINS, size: int = DOMAIN_SIZE) -> Path:
    """``out/domain-<d>-<name>/{train,val,test}/<class>/<row>.png``: every domain holds all 10 classes.

    Each domain sees its own images (a new camera photographs new items): per class, the train file's
    rows are split into disjoint train / val sets for every domain, the test file's into disjoint
    test sets. Reused when ``out/dataset.json`` records the same request.
    """
    from edgecl.datasets import FASHION_CLASSES, load_fashion_mnist, per_class_subsample, png_bytes
    from edgecl.formats.atomic import atomic_dir, atomic_write_json

    request = {"domains": list(domains), "train_per_class": train_per_class, "val_per_class": val_per_class,
               "test_per_class": test_per_class, "seed": seed, "size": size, "version": 1}
    stamp = out / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("request") == request:
        return out
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    n = len(domains)
    picks: dict[tuple[str, str], list[np.ndarray]] = {}
    for c in range(len(FASHION_CLASSES)):
        tr = per_class_subsample(train_y, c, [train_per_class, val_per_class] * n, seed)
        te_all = per_class_subsample(test_y, c, [test_per_class] * n, seed)
        for d, name in enumerate(domains):
            picks.setdefault((name, "train"), []).append(tr[2 * d])
            picks.setdefault((name, "val"), []).append(tr[2 * d + 1])
            picks.setdefault((name, "test"), []).append(te_all[d])
    for d, name in enumerate(domains):
        for split in ("train", "val", "test"):
            x, y = (test_x, test_y) if split == "test" else (train_x, train_y)
            rows = np.concatenate(picks[(name, split)])
            images = render(name, x, rows, seed, size)
            with atomic_dir(out / domain_dir(d, name) / split, overwrite=True) as tmp:
                for img, row in zip(images, rows.tolist(), strict=True):
                    cls = FASHION_CLASSES[int(y[row])]
                    (tmp / cls).mkdir(exist_ok=True)
                    (tmp / cls / f"{row:05d}.png").write_bytes(png_bytes(img))
    atomic_write_json(stamp, {"dataset": "fashion-mnist-domains", "request": request})
    return out


def domain_dir(index: int, name: str) -> str:
    return f"domain-{index + 1}-{name}"


def contact_sheet(path: Path, seed: int = 1993, per_domain: int = 8, size: int = DOMAIN_SIZE) -> Path:
    """A PNG grid: one row per domain, the same ``per_domain`` test images (what each camera sees)."""
    from edgecl.datasets import load_fashion_mnist
    x, y = load_fashion_mnist("test")
    rows = [int(np.flatnonzero(y == c)[0]) for c in range(per_domain)]
    grid = np.concatenate([np.concatenate(list(render(d, x, rows, seed, size)), axis=1) for d in DOMAINS], axis=0)
    Image.fromarray(grid).save(path)
    return path
