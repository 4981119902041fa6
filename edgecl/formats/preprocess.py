"""Preprocessing: from decoded pixels to the model's input tensor, the one rule host and device share.

A bundle's manifest (and a recipe) carries everything needed, as timm's ``PretrainedCfg`` does:
``input_size`` [H, W], per-channel ``mean`` and ``std`` (RGB, on [0, 1] pixels) and the resize
``interpolation``. Images are resized to exactly H x W (no crop: the export calibrates on the same
pixels), converted to float32 in [0, 1], normalised ``(x - mean) / std`` and laid out NCHW.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    input_size: tuple[int, int]              # (H, W) every image is resized to
    mean: tuple[float, float, float]         # per-channel mean (RGB, on [0, 1] pixels)
    std: tuple[float, float, float]          # per-channel std
    interpolation: str = "bilinear"          # resize filter: a key of RESAMPLE

    @classmethod
    def of(cls, source) -> Preprocess:  # noqa: ANN001 - a BundleManifest or a Recipe
        """The preprocessing a manifest (or recipe) describes."""
        h, w = (int(s) for s in source.input_size)
        return cls((h, w), tuple(float(v) for v in source.mean), tuple(float(v) for v in source.std),  # type: ignore[arg-type]
                   source.interpolation)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return normalize(pixels, self.mean, self.std)


def resize_rgb(image: Image.Image, size: Iterable[int], interpolation: str = "bilinear") -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3] of ``size`` = (H, W)."""
    h, w = (int(s) for s in size)
    rgb = image.convert("RGB")  # grayscale / palette / RGBA -> 3 channels
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), RESAMPLE[interpolation])
    return np.asarray(rgb, dtype=np.uint8)


def normalize(pixels: np.ndarray, mean: Iterable[float], std: Iterable[float]) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], scaled to [0, 1] then (x - mean) / std."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    normalized = (scaled - np.asarray(list(mean), np.float32)) / np.asarray(list(std), np.float32)
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), dtype=np.float32)
