"""Exemplar memory: a few pre-processed images per class (issue 6).

Shared format: the host ships the calibration classes' exemplars in the bundle
(``exemplars.safetensors``, chosen at export), the device keeps its own in its state.

Rule (documented in docs/device.md):
- Stored: resized uint8 pixels [H, W, 3] (what the model sees before normalisation), so an
  exemplar costs H * W * 3 bytes and can be re-embedded by any later backbone.
- Budget: ``profile.exemplar_budget_mb`` split evenly over every class that has exemplars,
  capped at ``max_per_class``; when a new class arrives the older classes shrink to their share.
- Choice: herding (Welling 2009, as in iCaRL, Rebuffi et al. CVPR 2017): greedily pick the image
  whose addition keeps the running mean of the chosen set closest to the class mean. The order is
  the priority order, so shrinking a class keeps its first n exemplars (iCaRL's reduction rule).
- Off when ``profile.store_images`` is false: nothing is written.
After adaptation the old classes' prototypes are recomputed from their exemplars with the new
backbone (exact for the stored subset), which beats drift estimation when images may be kept.

File ``exemplars.safetensors``: ``pixels`` uint8 [M, H, W, 3], ``labels`` int64 [M] (row index
into the metadata's ``classes`` JSON list), ``__metadata__`` format "edgecl-exemplars", version "1".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata

EXEMPLARS_FORMAT = "edgecl-exemplars"


def herding_order(embeddings: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` rows chosen by herding, in priority order."""
    x = np.asarray(embeddings, np.float64)
    count = min(count, x.shape[0])
    target = x.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(x.shape[0], bool)
    for k in range(1, count + 1):
        # mean of the chosen set if row i were added: (running + x_i) / k
        candidate = np.linalg.norm(target - (running + x) / k, axis=1)
        candidate[~available] = np.inf
        i = int(np.argmin(candidate))
        chosen.append(i)
        available[i] = False
        running += x[i]
    return np.asarray(chosen, np.int64)


def per_class_quota(budget_bytes: int, bytes_per_image: int, n_classes: int, max_per_class: int) -> int:
    if n_classes == 0 or bytes_per_image <= 0:
        return 0
    return int(min(max_per_class, budget_bytes // (bytes_per_image * n_classes)))


@dataclass
class ExemplarMemory:
    classes: list[str]        # class names (label index order)
    pixels: np.ndarray        # [M, H, W, 3] uint8
    labels: np.ndarray        # [M] int64, priority order within a class

    @classmethod
    def empty(cls, size: tuple[int, int]) -> ExemplarMemory:
        return cls([], np.zeros((0, size[0], size[1], 3), np.uint8), np.zeros(0, np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def of_class(self, name: str) -> np.ndarray:
        if name not in self.classes:
            return self.pixels[:0]
        return self.pixels[self.labels == self.classes.index(name)]

    def joined(self, other: ExemplarMemory, take: list[str]) -> ExemplarMemory:
        """This memory plus ``other``'s images of the classes ``take``, appended after this memory's
        (a class both hold keeps one label, its new images after its old ones; a class named in
        ``take`` that ``other`` has no image of is listed with none)."""
        classes = list(self.classes) + [c for c in dict.fromkeys(take) if c not in self.classes]
        pixels, labels = [self.pixels], [self.labels]
        for name in dict.fromkeys(take):
            images = other.of_class(name)
            pixels.append(images)
            labels.append(np.full(len(images), classes.index(name), np.int64))
        return ExemplarMemory(classes, np.concatenate(pixels).astype(np.uint8), np.concatenate(labels))

    def update(self, new: dict[str, tuple[np.ndarray, np.ndarray]], budget_bytes: int,
               max_per_class: int) -> ExemplarMemory:
        """New memory: classes in ``new`` (name -> (pixels, embeddings)) replaced by their herding
        choice, every class trimmed to the per-class quota of the (possibly larger) class set."""
        names = list(self.classes) + [n for n in new if n not in self.classes]
        bytes_per_image = int(np.prod(self.pixels.shape[1:])) if self.pixels.ndim == 4 else 0
        quota = per_class_quota(budget_bytes, bytes_per_image, len(names), max_per_class)
        pixels: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        kept: list[str] = []
        for name in names:
            if name in new:
                images, embeddings = new[name]
                chosen = images[herding_order(embeddings, quota)] if quota else images[:0]
            else:
                chosen = self.of_class(name)[:quota]
            if len(chosen):
                labels.append(np.full(len(chosen), len(kept), np.int64))
                pixels.append(chosen)
                kept.append(name)
        if not pixels:
            return ExemplarMemory(kept, self.pixels[:0], np.zeros(0, np.int64))
        return ExemplarMemory(kept, np.concatenate(pixels).astype(np.uint8), np.concatenate(labels))

    def to_bytes(self) -> bytes:
        return canonical_safetensors({"pixels": np.ascontiguousarray(self.pixels, np.uint8),
                                      "labels": np.ascontiguousarray(self.labels, np.int64)},
                                     metadata={"format": EXEMPLARS_FORMAT, "format_version": "1",
                                               "classes": json.dumps(self.classes)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ExemplarMemory:
        try:
            tensors = _st_load(data)
            meta = read_metadata(data)
            if meta.get("format") != EXEMPLARS_FORMAT:
                raise ValueError("not an edgecl exemplar file")
            return cls(json.loads(meta["classes"]), tensors["pixels"], tensors["labels"].astype(np.int64))
        except Exception as exc:
            raise BundleError(f"exemplar memory is damaged ({exc})",
                              "run `edgecl rollback`, or re-copy the bundle if it is the bundle's file") from exc

    def save_file(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load_file(cls, path: Path) -> ExemplarMemory:
        return cls.from_bytes(Path(path).read_bytes())
