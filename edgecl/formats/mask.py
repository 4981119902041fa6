"""The mask: which elements of which weight tensors are trainable (``mask.safetensors``).

Format (safetensors, no pickle):
- for each masked tensor NAME (an exported parameter name, e.g. ``blocks.0.0.conv_dw.weight``):
  ``NAME.indices`` int32 [k] - flat positions into the tensor, strictly increasing;
  ``NAME.overlap``  int32 [k] - how many earlier rounds updated that element (docs/method.md#overlap).
- ``__metadata__``: ``format`` = "edgecl-mask", ``format_version`` = "1", ``order`` = JSON list of
  names in delta order, ``shapes`` = JSON object name -> shape, ``total_params`` = number of
  parameters of the whole exported model (the denominator of ``selected_fraction``).

The delta vector concatenates the tensors' selected elements in ``order``; tensor i owns
``delta[offsets[i]: offsets[i] + counts[i]]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata

MASK_FORMAT = "edgecl-mask"
MASK_FORMAT_VERSION = 1


@dataclass
class Mask:
    order: list[str]                                   # tensor names, in delta order
    shapes: dict[str, tuple[int, ...]]                 # name -> full tensor shape
    indices: dict[str, np.ndarray]                     # name -> int32 flat positions (increasing)
    total_params: int                                  # all parameters of the exported model
    overlap: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int32 counts, aligned with indices

    def __post_init__(self) -> None:
        for name in self.order:
            idx = np.ascontiguousarray(self.indices[name], dtype=np.int32)
            self.indices[name] = idx
            ov = self.overlap.get(name)
            self.overlap[name] = (np.zeros(idx.shape, np.int32) if ov is None
                                  else np.ascontiguousarray(ov, dtype=np.int32))
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def counts(self) -> list[int]:
        return [int(self.indices[n].size) for n in self.order]

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.counts)[:-1]])] if self.order else []

    @property
    def total_selected(self) -> int:
        return int(sum(self.counts))

    @property
    def selected_fraction(self) -> float:
        return self.total_selected / max(self.total_params, 1)

    def slices(self) -> dict[str, slice]:
        return {n: slice(o, o + c) for n, o, c in zip(self.order, self.offsets, self.counts, strict=False)}

    def overlap_vector(self) -> np.ndarray:
        """Overlap counts in delta order, [K] int32."""
        if not self.order:
            return np.zeros(0, np.int32)
        return np.concatenate([self.overlap[n] for n in self.order]).astype(np.int32)

    def validate(self) -> None:
        if len(set(self.order)) != len(self.order):
            raise BundleError("mask lists a tensor twice", "re-export the bundle")
        for name in self.order:
            idx = self.indices[name]
            size = int(np.prod(self.shapes[name])) if self.shapes[name] else 1
            if idx.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0))):
                raise BundleError(f"mask indices of {name} are not increasing positions inside {self.shapes[name]}",
                                  "the mask file is damaged: re-export the bundle")
            if self.overlap[name].shape != idx.shape:
                raise BundleError(f"mask overlap counts of {name} do not match its indices",
                                  "the mask file is damaged: re-export the bundle")

    # -- bytes ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, np.ndarray] = {}
        for name in self.order:
            tensors[f"{name}.indices"] = self.indices[name]
            tensors[f"{name}.overlap"] = self.overlap[name]
        metadata = {
            "format": MASK_FORMAT,
            "format_version": str(MASK_FORMAT_VERSION),
            "order": json.dumps(self.order),
            "shapes": json.dumps({n: list(self.shapes[n]) for n in self.order}, sort_keys=True),
            "total_params": str(int(self.total_params)),
        }
        return canonical_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Mask:
        try:
            tensors = _st_load(data)
            meta = read_metadata(data)
            if meta.get("format") != MASK_FORMAT:
                raise ValueError("not an edgecl mask")
            if int(meta.get("format_version", "0")) > MASK_FORMAT_VERSION:
                raise BundleError(f"mask format version {meta['format_version']} is newer than this edgecl "
                                  f"supports ({MASK_FORMAT_VERSION})", "upgrade edgecl on this machine")
            order = json.loads(meta["order"])
            shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
            return cls(order=order, shapes=shapes,
                       indices={n: tensors[f"{n}.indices"] for n in order},
                       overlap={n: tensors[f"{n}.overlap"] for n in order},
                       total_params=int(meta["total_params"]))
        except BundleError:
            raise
        except Exception as exc:  # any parse failure means the same thing to the user
            raise BundleError(f"mask file is not a valid edgecl mask ({exc})",
                              "re-copy mask.safetensors from the exporting host") from exc

    def save_file(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load_file(cls, path: str | Path) -> Mask:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read mask {path} ({exc.strerror})", "check the bundle folder") from exc
        return cls.from_bytes(data)

    # -- vector <-> tensors ----------------------------------------------------------------------
    def scatter(self, delta: np.ndarray, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W = W0 + delta at the masked positions, for every masked tensor (copies)."""
        if delta.shape != (self.total_selected,):
            raise BundleError(f"delta has {delta.shape} values, the mask selects {self.total_selected}",
                              "use a delta made for this bundle")
        out: dict[str, np.ndarray] = {}
        for name, sl in self.slices().items():
            w = np.array(base[name], dtype=np.float32, copy=True)
            flat = w.reshape(-1)
            flat[self.indices[name]] += delta[sl].astype(np.float32)
            out[name] = w
        return out


def overlap_to_bytes(overlap: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Overlap counts file: per tensor NAME, ``NAME.indices`` int32 and ``NAME.counts`` int32."""
    tensors: dict[str, np.ndarray] = {}
    for name, (idx, cnt) in overlap.items():
        tensors[f"{name}.indices"] = np.ascontiguousarray(idx, np.int32)
        tensors[f"{name}.counts"] = np.ascontiguousarray(cnt, np.int32)
    return canonical_safetensors(tensors, metadata={"format": "edgecl-overlap", "format_version": "1"})


def overlap_from_bytes(data: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tensors = _st_load(data)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.indices"], tensors[f"{n}.counts"]) for n in names}


Overlap = dict[str, tuple[np.ndarray, np.ndarray]]  # tensor name -> (flat indices int32, counts int32)


def overlap_add(history: Overlap, update: Overlap) -> Overlap:
    """Per element, history counts + update counts (docs/method.md#overlap tracks every element ever updated)."""
    out: Overlap = {}
    for name in list(history) + [n for n in update if n not in history]:
        idx = np.concatenate([history.get(name, (np.zeros(0, np.int32),) * 2)[0],
                              update.get(name, (np.zeros(0, np.int32),) * 2)[0]]).astype(np.int64)
        cnt = np.concatenate([history.get(name, (np.zeros(0, np.int32),) * 2)[1],
                              update.get(name, (np.zeros(0, np.int32),) * 2)[1]]).astype(np.int64)
        unique, inverse = np.unique(idx, return_inverse=True)
        summed = np.bincount(inverse, weights=cnt, minlength=unique.size).astype(np.int32)
        keep = summed > 0
        if keep.any():
            out[name] = (unique[keep].astype(np.int32), summed[keep])
    return out


def overlap_of_mask(mask: Mask) -> Overlap:
    """The counts a mask carries, as an overlap history (elements with a count above 0)."""
    out: Overlap = {}
    for name in mask.order:
        keep = mask.overlap[name] > 0
        if keep.any():
            out[name] = (mask.indices[name][keep], mask.overlap[name][keep])
    return out
