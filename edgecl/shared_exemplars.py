"""The "exemplars shared" mode of a release round (a device profile's ``share_exemplars``), host side.

A device that shares its stored exemplars of the classes it added sends them in its delta. The
release reads them for those classes only (``own_exemplars``: the poisoning rule, a device never
speaks for a class it did not add), embeds them under the candidate and the current version
(``shared_statistics``) and answers for the device as `edgecl restat` would from the same images
(``statistics_answer``), so such a device need not answer (``covered``); the released version ships
the fleet's exemplars (``attach_fleet_exemplars``) and every device replays every class.
docs/server.md#exemplars-shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl import classstats
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.candidate import statistics_answer
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.prototypes import Prototypes

SHIPPED_EXEMPLARS_PER_CLASS = 20   # the fleet's exemplars a released bundle ships per class (export's default)


def own_exemplars(d: delta_format.Delta, own: list[str], size: tuple[int, ...]) -> ExemplarMemory | None:
    """A counted delta's shared exemplars of its own classes only (those the current version does not
    know): images of any other class are never read, like its statistics (issue 21's poison rule; the
    server bounded each class's images by its count). None when it shares none of them, or images of
    another size than the current version takes."""
    memory = d.exemplars
    if memory is None or tuple(memory.pixels.shape[1:3]) != tuple(size):
        return None
    names = [c for c in memory.classes if c in own]
    if not names:
        return None
    keep = np.isin(memory.labels, [memory.classes.index(c) for c in names])
    remap = np.asarray([names.index(c) if c in names else -1 for c in memory.classes], np.int64)
    return ExemplarMemory(names, memory.pixels[keep], remap[memory.labels[keep]])


def covered(own: dict[str, list[str]], shared: dict[str, ExemplarMemory]) -> list[str]:
    """The devices whose every own class comes with shared exemplars: the host computes their
    statistics under the candidate itself, so they need not answer `edgecl restat`."""
    return sorted(d for d, classes in own.items()
                  if classes and d in shared and set(classes) <= set(shared[d].classes))


@dataclass
class SharedStatistics:
    answers: dict[str, delta_format.Delta]  # device -> its shared classes' statistics answer (as restat's)
    table: Prototypes                     # per class, summed exactly over the devices (classstats)
    fleet: ExemplarMemory                 # what the released bundle ships of them (herding, a cap per class)


def shared_statistics(shared: dict[str, ExemplarMemory], candidate_dir: Path, current_dir: Path,
                      embed: Callable[[Path, np.ndarray], np.ndarray]) -> SharedStatistics | None:
    """The shared exemplars embedded under the candidate's and the current version's own graphs
    (onnxruntime, once each for all), each device's answer from them as `edgecl restat` would send it
    from the same images (``statistics_answer``: means, counts and scatter under both backbones, so
    the gate judges mode 2 with the LDA head too), and the exact sum over devices per class
    (classstats.merge_by_counts). None when no device shared any."""
    devices = sorted(shared)
    if not devices:
        return None
    pixels = np.concatenate([shared[d].pixels for d in devices])
    embeddings, base = embed(candidate_dir, pixels), embed(current_dir, pixels)
    manifest = mf.load_manifest(candidate_dir)
    answers: dict[str, delta_format.Delta] = {}
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}      # class -> (pixels, embeddings) per device
    start = 0
    for device in devices:
        memory = shared[device]
        rows = slice(start, start + len(memory.labels))
        start = rows.stop
        answers[device] = statistics_answer(manifest, device, list(memory.classes), memory.labels,
                                            embeddings[rows], base[rows])
        for j, name in enumerate(memory.classes):
            mask = memory.labels == j
            if mask.any():                     # a class listed with no image has no statistics to ship
                pooled.setdefault(name, []).append((memory.pixels[mask], embeddings[rows][mask]))
    summed = Prototypes.empty(int(embeddings.shape[1]))
    chosen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, parts in pooled.items():
        tables = [a.prototypes for a in answers.values() if a.prototypes is not None and name in a.prototypes.classes]
        mean, count = classstats.merge_by_counts([t.means[t.classes.index(name)] for t in tables],
                                                 [int(t.counts[t.classes.index(name)]) for t in tables])
        summed.upsert(name, mean, count)
        chosen[name] = (np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts]))
    size = (int(pixels.shape[1]), int(pixels.shape[2]))
    fleet = ExemplarMemory.empty(size).update(chosen, budget_bytes=1 << 62, max_per_class=SHIPPED_EXEMPLARS_PER_CLASS)
    return SharedStatistics(answers, summed, fleet)


def attach_fleet_exemplars(bundle_dir: Path, shared: SharedStatistics | None, classes: list[str]) -> None:
    """The released bundle ships the fleet's exemplars: its own ``exemplars.safetensors`` (the
    calibration classes') plus the shared ones of the classes it ships, listed and hashed in the
    manifest like every file a device keeps (the device checks it before reading it)."""
    if shared is None:
        return
    take = [c for c in shared.fleet.classes if c in classes]
    if not take:
        return
    path = bundle_dir / mf.EXEMPLARS
    m = mf.load_manifest(bundle_dir)
    base = ExemplarMemory.load_file(path) if path.exists() else ExemplarMemory.empty(
        (int(m.input_size[0]), int(m.input_size[1])))
    base.joined(shared.fleet, [c for c in take if c not in base.classes]).save_file(path)
    m.files[mf.EXEMPLARS] = sha256_file(path)
    m.sizes[mf.EXEMPLARS] = path.stat().st_size
    m.save(bundle_dir)


def answer_from_shared(received: dict[str, delta_format.Delta], shared: SharedStatistics | None,
                       devices: list[str]) -> list[str]:
    """Each of ``devices`` (covered by its shared images) that sent no statistics under the candidate
    answers with those computed from its shared images; one that answered keeps its answer (it
    embedded every image it holds, the shared ones among them). Returns the devices filled in."""
    if shared is None:
        return []
    filled = [d for d in devices if d not in received and d in shared.answers]
    for device in filled:
        received[device] = shared.answers[device]
    return filled


def shared_note(shared: SharedStatistics | None, devices: list[str]) -> dict[str, Any]:
    """The report's statistics row of each device whose classes came from its shared exemplars."""
    if shared is None:
        return {}
    rows: dict[str, Any] = {}
    for d in devices:
        table = shared.answers[d].prototypes if d in shared.answers else None
        if table is not None:
            rows[d] = {"answered": False, "source": "shared exemplars", "classes": list(table.classes),
                       "images": int(table.counts.sum())}
    return rows


def fleet_memory(version_exemplars: Path, known: list[str], own: dict[str, list[str]],
                 shared: dict[str, ExemplarMemory], size: tuple[int, ...]) -> tuple[ExemplarMemory, list[str]]:
    """Exemplars of every class a candidate will serve, for `edgecl release --consolidate`: the current
    version's (its calibration classes', and the fleet's it ships after a mode-2 release) plus each
    counted device's shared exemplars of its own classes. Returns them and the classes that have none
    (the current version's classes it ships no exemplar of, a device's classes it did not share)."""
    base = ExemplarMemory.load_file(version_exemplars) if version_exemplars.exists() else \
        ExemplarMemory.empty((int(size[0]), int(size[1])))
    for device in sorted(shared):
        memory = shared[device]
        base = base.joined(memory, [c for c in memory.classes if len(memory.of_class(c))])
    have = {base.classes[i] for i in np.unique(base.labels).tolist()}
    wanted = list(known) + [c for d in sorted(own) for c in own[d] if c not in known]
    return base, [c for c in dict.fromkeys(wanted) if c not in have]
