"""The head the release gate judges with: the one the devices serve (docs/server.md, "The release round").

A device serves with the LDA head once it has adapted (`--head auto`): class means plus one
within-class covariance pooled over every class. Judging a release with cosine prototypes (ncm)
instead compares a head nobody serves, and the weaker one: on the demo's fleet, the frozen v1 scores
74.8 with ncm and 83.5 with LDA on the test images. Best against best means LDA on both sides.

The LDA head needs every class's scatter under the backbone it scores. Like means and counts, a
class's scatter adds up only under one backbone, so each piece comes from whoever holds the images:

- the current version's classes: the host's ``--class-data`` (the images the bundle was exported
  from), embedded under the current and the candidate backbone (exact, dense); a current class the
  class data lacks (one a device added in an earlier round) from the exemplars the current version
  ships of it (mode 2 ships the fleet's: ``exemplar_pieces``); or, for the current backbone only,
  the scatter a released version ships (``fleet_scatter.safetensors``);
- each device's classes: its statistics delta (`edgecl restat`), which carries their scatter under
  the candidate (``scatter``) and under the current backbone (``base_scatter``), rank 16.

Three pooled covariances follow: the candidate's (every piece under the candidate: what the devices
will serve after pulling, so the released bundle ships it), the frozen baseline's (every piece
under the current backbone), and the current version's (its own classes' pieces). When a piece is
missing (no ``--class-data``, a device on an edgecl that sends no scatter, a later round whose
current classes the class data does not cover) the gate judges with ncm on both sides, and says why.

numpy + formats only; the caller passes the embedding function (onnxruntime, the device's code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.formats import manifest as mf
from edgecl.formats import scatter as sc
from edgecl.formats.delta import Delta
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import score

Embed = Callable[[Path, np.ndarray], np.ndarray]     # (bundle folder, uint8 pixels) -> embeddings
Piece = tuple[list[str], "sc.Scatter | tuple[np.ndarray, int, int]"]   # (classes, scatter)


@dataclass
class GateHead:
    name: str                                   # "lda" | "ncm"
    why: str                                    # one line: why this head
    covariances: dict[str, np.ndarray] = field(default_factory=dict)  # role -> LDA covariance
    shipped: sc.Scatter | None = None           # the candidate's pooled scatter (ships with the release)
    shipped_classes: list[str] = field(default_factory=list)

    def score(self, role: str, embeddings: np.ndarray, truth: list[str], table: Prototypes | None
              ) -> dict[str, Any] | None:
        """``role``: "candidate" (also the candidate among the current classes: served with the same
        covariance), "baseline" or "current"."""
        return score(embeddings, truth, table, self.covariances.get(role) if self.name == "lda" else None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "why": self.why}


NCM = GateHead("ncm", "asked for (--head ncm)")


def _covered(pieces: list[Piece]) -> set[str]:
    return {c for classes, _ in pieces for c in classes}


def _pooled(pieces: list[Piece]) -> tuple[np.ndarray, int, int]:
    return sc.pooled([p for _, p in pieces])


def host_pieces(class_data: Path, known: list[str], dirs: dict[str, Path], embed: Embed
                ) -> dict[str, Piece] | None:
    """The exact scatter of the current classes ``class_data`` has images of, under each backbone in
    ``dirs`` (role -> bundle folder); None when it has images of none of them."""
    from edgecl.formats.images import load_image_folder

    m = mf.load_manifest(next(iter(dirs.values())))
    images = load_image_folder(class_data, m.input_size, m.interpolation, progress=False)
    classes = [c for c in images.classes if c in known]
    if not classes:
        return None
    keep = np.isin(images.labels, [images.classes.index(c) for c in classes])
    pixels, labels = images.pixels[keep], images.labels[keep]
    return {role: (classes, sc.class_scatter(embed(d, pixels), labels)) for role, d in dirs.items()}


def exemplar_pieces(host: dict[str, Piece] | None, known: list[str], classes: list[str], labels: np.ndarray,
                    embedded: dict[str, np.ndarray]) -> dict[str, Piece] | None:
    """``host`` with the scatter of the current classes it lacks added from the exemplars the current
    version ships of them (``classes``/``labels``: the exemplars; ``embedded``: role -> their
    embeddings under that backbone). A class a device added in an earlier round has no image in the
    host's class data; in mode 2 the version ships the fleet's exemplars of it (20 a class), exact
    under both backbones on those images, so a round after a release still judges with LDA."""
    have = set(host["current"][0]) if host else set()
    wanted = [c for c in known if c not in have and c in classes]
    if not wanted or not embedded:
        return host
    keep = np.isin(labels, [classes.index(c) for c in wanted])
    out: dict[str, Piece] = {}
    for role, x in embedded.items():
        piece = sc.class_scatter(x[keep], labels[keep])
        if host is not None:
            names, scatter = host[role]
            out[role] = ([*names, *wanted], sc.pooled([scatter, piece]))
        else:
            out[role] = (wanted, piece)
    return out


def choose(candidate: Prototypes, known: list[str], received: dict[str, Delta], host: dict[str, Piece] | None,
           current_dir: Path) -> GateHead:
    """LDA when every class the candidate holds has a scatter under both backbones, else ncm (why)."""
    dim = int(candidate.means.shape[1])
    if host is None:
        return GateHead("ncm", "no scatter of the current classes: pass --class-data, the folder the bundle "
                               "was exported from")
    # The current version as released: the scatter it shipped (judged by the last release, every class
    # it knows), else the host's of its classes.
    current: list[Piece] = []
    if (current_dir / mf.FLEET_SCATTER).exists():
        shipped, classes, _ = sc.load_file(current_dir / mf.FLEET_SCATTER, dim)
        current = [(classes, shipped)] if set(known) <= set(classes) else []
    if not current and set(known) <= set(host["current"][0]):
        current = [host["current"]]
    if not current:
        lacking = ", ".join(sorted(set(known) - set(host["current"][0])))[:200]
        return GateHead("ncm", f"no scatter of the current version's {lacking} (neither --class-data nor a "
                               "scatter the version ships)")
    under_candidate: list[Piece] = [host["candidate"]]
    under_current: list[Piece] = [host["current"]]
    for device, d in sorted(received.items()):
        if d.prototypes is None or not len(d.prototypes):
            continue
        if d.scatter is None or d.base_scatter is None:
            return GateHead("ncm", f"{device} sent no scatter (an edgecl before delta format 5)")
        under_candidate.append((list(d.prototypes.classes), d.scatter))
        under_current.append((list(d.prototypes.classes), d.base_scatter))
    missing = sorted(set(candidate.classes) - (_covered(under_candidate) & _covered(under_current)))
    if missing:
        return GateHead("ncm", f"no scatter of {', '.join(missing)[:200]}")
    pooled = {"candidate": _pooled(under_candidate), "baseline": _pooled(under_current), "current": _pooled(current)}
    head = GateHead("lda", "every class's scatter under both backbones",
                    {role: sc.covariance(*p) for role, p in pooled.items()})
    head.shipped = sc.Scatter.from_dense(*pooled["candidate"], rank=sc.RANK_BUNDLE)
    head.shipped_classes = sorted(_covered(under_candidate))
    return head
