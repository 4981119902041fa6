"""Class prototypes (SimpleCIL head): ``prototypes.safetensors``.

Tensors: ``prototypes`` float32 [C, D] (mean raw embedding per class), ``counts`` int64 [C]
(images that went into each mean), and optionally ``seen`` uint64 [S] with ``seen_rows`` int64 [S]:
the fingerprints of the images counted in each class's mean (``seen_rows`` names the class row), so
an image is counted once however often it is shown (export --data X, then adapt --data X: the second
pass replaces those images' old embeddings instead of adding them again). ``__metadata__``: ``format`` = "edgecl-prototypes",
``format_version`` = "1", ``classes`` = JSON list of C class names (row order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata


@dataclass
class Prototypes:
    classes: list[str]          # class names, row order
    means: np.ndarray           # [C, D] float32
    counts: np.ndarray          # [C] int64
    seen: dict[str, np.ndarray] = field(default_factory=dict)  # class -> sorted uint64 image fingerprints

    @classmethod
    def empty(cls, dim: int) -> Prototypes:
        return cls([], np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    def copy(self) -> Prototypes:
        return Prototypes(list(self.classes), self.means.copy(), self.counts.copy(),
                          {c: v.copy() for c, v in self.seen.items()})

    def mark_seen(self, name: str, fingerprints: np.ndarray) -> None:
        """Record that these images are counted in class ``name``'s mean."""
        old = self.seen.get(name, np.zeros(0, np.uint64))
        self.seen[name] = np.union1d(old, np.asarray(fingerprints, np.uint64)).astype(np.uint64)

    def seen_mask(self, name: str, fingerprints: np.ndarray) -> np.ndarray:
        """[N] bool: which of these images class ``name``'s mean already counts."""
        return np.isin(np.asarray(fingerprints, np.uint64), self.seen.get(name, np.zeros(0, np.uint64)))

    def __len__(self) -> int:
        return len(self.classes)

    def upsert(self, name: str, mean: np.ndarray, count: int) -> None:
        """Set a class's prototype, adding the class if new."""
        mean = np.asarray(mean, np.float32).reshape(1, -1)
        if name in self.classes:
            i = self.classes.index(name)
            self.means[i] = mean[0]
            self.counts[i] = count
        else:
            self.classes.append(name)
            self.means = np.concatenate([self.means.reshape(-1, mean.shape[1]), mean]).astype(np.float32)
            self.counts = np.concatenate([self.counts, [count]]).astype(np.int64)

    def to_bytes(self) -> bytes:
        tensors: dict[str, np.ndarray] = {"prototypes": np.ascontiguousarray(self.means, np.float32),
                   "counts": np.ascontiguousarray(self.counts, np.int64)}
        kept = [(self.classes.index(c), v) for c, v in self.seen.items() if c in self.classes and len(v)]
        if kept:
            tensors["seen"] = np.concatenate([v for _, v in kept]).astype(np.uint64)
            tensors["seen_rows"] = np.concatenate([np.full(len(v), r, np.int64) for r, v in kept])
        return canonical_safetensors(tensors,
                        metadata={"format": "edgecl-prototypes", "format_version": "1",
                                  "classes": json.dumps(self.classes)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Prototypes:
        try:
            tensors = _st_load(data)
            meta = read_metadata(data)
            if meta.get("format") != "edgecl-prototypes":
                raise ValueError("not an edgecl prototypes file")
            classes = json.loads(meta["classes"])
            means, counts = tensors["prototypes"], tensors["counts"]
            if means.shape[0] != len(classes) or counts.shape != (len(classes),):
                raise ValueError("class names and rows disagree")
            seen: dict[str, np.ndarray] = {}
            if "seen" in tensors:
                fps, rows = tensors["seen"].astype(np.uint64), tensors["seen_rows"].astype(np.int64)
                if fps.shape != rows.shape or (len(rows) and (rows.min() < 0 or rows.max() >= len(classes))):
                    raise ValueError("seen fingerprints and their class rows disagree")
                seen = {classes[r]: np.unique(fps[rows == r]) for r in np.unique(rows)}
            return cls(classes, means.astype(np.float32), counts.astype(np.int64), seen)
        except Exception as exc:
            raise BundleError(f"prototypes file is damaged ({exc})",
                              "run `edgecl rollback` or re-copy the bundle") from exc

    def save_file(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load_file(cls, path: str | Path) -> Prototypes:
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except OSError as exc:
            raise BundleError(f"cannot read {path} ({exc.strerror})", "check the bundle folder") from exc


def image_fingerprints(pixels: np.ndarray) -> np.ndarray:
    """[N] uint64: a 64-bit BLAKE2b digest of each decoded image (uint8 [N, H, W, 3] at the model's input
    size). Host and device decode with the same loader, so the same file gives the same fingerprint."""
    return np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(px).tobytes(), digest_size=8).digest(),
                                    "little") for px in pixels], np.uint64)
