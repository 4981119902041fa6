"""Class prototypes (SimpleCIL head): ``prototypes.safetensors``.

Tensors: ``prototypes`` float32 [C, D] (mean raw embedding per class), ``counts`` int64 [C]
(images that went into each mean). ``__metadata__``: ``format`` = "edgecl-prototypes",
``format_version`` = "1", ``classes`` = JSON list of C class names (row order).
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


@dataclass
class Prototypes:
    classes: list[str]          # class names, row order
    means: np.ndarray           # [C, D] float32
    counts: np.ndarray          # [C] int64

    @classmethod
    def empty(cls, dim: int) -> Prototypes:
        return cls([], np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

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
        return canonical_safetensors({"prototypes": np.ascontiguousarray(self.means, np.float32),
                         "counts": np.ascontiguousarray(self.counts, np.int64)},
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
            return cls(classes, means.astype(np.float32), counts.astype(np.int64))
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
