"""`edgecl restat`: this device's class statistics under the fleet's candidate backbone (phase 1 of a
release round sends the candidate; docs/server.md, "The release round").

A class's mean and count add up across devices only under one backbone. The device holds the images
of its classes, so it alone can compute them under the candidate:

    1. ask for the open statistics candidate (``GET /v1/releases/latest?bundle_id=<id>.candidate``:
       a canary release only the devices whose deltas were merged can see); it must have been made
       from the version this device runs;
    2. download it (signature first, then every file's sha256; a temp folder, removed after);
    3. embed, under the candidate, the images this device holds of its own classes: the task folder
       of its last adaptation when it is still on disk, and its own exemplars (not the ones the
       bundle shipped); each image once (by fingerprint);
    4. push a statistics-only delta against the candidate: no weight change, each class's mean and
       image count, and the classes' means and within-class scatter (what the LDA head needs) under
       this version's own backbone too (the release's frozen baseline, the same images), each scatter a
       rank-16 factor (formats.scatter; 40 kB each for Lite0), signed with the device key.

Nothing of the device's own bundle or state changes. A device that does not answer before the
operator finishes the round keeps its classes at the host's estimate, and its group is reported as
not judged.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecl.errors import DataError, EdgeclError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.candidate import candidate_id, is_candidate_report, statistics_answer
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.images import load_image_folder
from edgecl.formats.prototypes import image_fingerprints
from edgecl.http_client import RetryPolicy, ServerRejected, api_json

from .deltafile import device_identity
from .infer import embed_own_weights
from .provision import DeviceConfig
from .pull import PullReport, fetch_release, parse_release, server_public_key
from .push import ALREADY, SENT, push_bytes
from .state import DeviceState, OpenBundle, bundle_prototypes, load_current, open_bundle


@dataclass
class RestatReport:
    status: str                          # "sent" | "no_candidate" | "other_version" | "nothing_held" | push status
    bundle_id: str
    candidate_version: int = 0
    classes: dict[str, int] = field(default_factory=dict)   # class -> images embedded under the candidate
    delta_bytes: int = 0
    downloaded_bytes: int = 0
    message: str = ""

    def line(self) -> str:
        if self.status == "sent":
            return (f"sent statistics under candidate v{self.candidate_version} of {self.bundle_id}: "
                    + ", ".join(f"{c} ({n} images)" for c, n in self.classes.items())
                    + f"; {self.delta_bytes:,} B pushed, {self.downloaded_bytes:,} B downloaded")
        return self.message


def held_images(bundle: OpenBundle, state: DeviceState) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, uint8 pixels [N, H, W, 3], labels [N]): the images this device holds of the classes
    it learned: its last adaptation's task folder (if still there) and its own exemplars (the bundle's
    shipped exemplars are not its images). Each image once."""
    m = bundle.manifest
    classes: list[str] = []
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    seen: set[int] = set()

    def add(name: str, images: np.ndarray) -> None:
        if name not in classes:
            classes.append(name)
        for fp, px in zip(image_fingerprints(images).tolist(), images, strict=True):
            if fp not in seen:
                seen.add(fp)
                pixels.append(px)
                labels.append(classes.index(name))

    task_dir = state.meta.get("data_dir")
    if isinstance(task_dir, str) and Path(task_dir).is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                task = load_image_folder(task_dir, m.input_size, m.interpolation, progress=False)
            except DataError:
                task = None
        if task is not None:
            for i, name in enumerate(task.classes):
                add(name, task.pixels[task.labels == i])
    if state.exemplars_path is not None:
        memory = ExemplarMemory.load_file(state.exemplars_path)
        shipped = (image_fingerprints(ExemplarMemory.load_file(bundle.path(mf.EXEMPLARS)).pixels)
                   if bundle.path(mf.EXEMPLARS).exists() else np.zeros(0, np.uint64))
        for name in memory.classes:
            images = memory.of_class(name)
            own = images[~np.isin(image_fingerprints(images), shipped)]
            if len(own) and (name in state.prototypes.classes or name not in bundle_prototypes(bundle).classes):
                add(name, own)
    h, w = int(m.input_size[0]), int(m.input_size[1])
    stacked = np.stack(pixels).astype(np.uint8) if pixels else np.zeros((0, h, w, 3), np.uint8)
    return classes, stacked, np.asarray(labels, np.int64)


def restat(bundle_dir: str | Path, server: str, token: str, server_key: str, device_id: str | None = None,
           key_hex: str | None = None, config: DeviceConfig | None = None,
           policy: RetryPolicy | None = None) -> RestatReport:
    public = server_public_key(server, token, server_key, "the candidate")
    bundle = open_bundle(bundle_dir)
    state = load_current(bundle)
    name, key = device_identity(device_id, key_hex, config)
    lineage = candidate_id(bundle.manifest.bundle_id)
    report = RestatReport("no_candidate", bundle.manifest.bundle_id)
    try:
        release = api_json(server, token, "GET", f"/v1/releases/latest?bundle_id={lineage}", policy=policy)
    except ServerRejected as exc:
        if exc.code != "not_found":
            raise
        report.message = f"no statistics candidate of {bundle.manifest.bundle_id} for this device: nothing to do"
        return report
    summary = release.get("report") or {}
    report.candidate_version = int(release.get("version", 0))
    if not is_candidate_report(summary) or int(summary.get("current_version", -1)) != bundle.manifest.version:
        report.status = "other_version"
        report.message = (f"the open candidate v{report.candidate_version} was made from v"
                          f"{summary.get('current_version')}, this device runs v{bundle.manifest.version}: "
                          "nothing sent (pull the released version first)")
        return report
    classes, pixels, labels = held_images(bundle, state)
    if not len(pixels):
        report.status = "nothing_held"
        report.message = ("this device holds no image of its classes (task folder gone, no exemplars): nothing "
                          "sent; the release keeps the host's estimate of its classes")
        return report
    scratch = Path(tempfile.mkdtemp(prefix=".edgecl-candidate-", dir=bundle.root.parent))
    try:
        pulled = PullReport("candidate", lineage, str(bundle.root), bundle.manifest.version, report.candidate_version)
        target = scratch / "candidate"
        fetch_release(bundle, parse_release(release, lineage), lineage, server, token, public, target, pulled,
                      policy)
        report.downloaded_bytes = pulled.downloaded_bytes
        candidate = open_bundle(target)
        # The same images under the candidate and under the backbone this device runs without its own
        # delta (the current version's: the release's frozen baseline counts the same images).
        stats = statistics_answer(candidate.manifest, name, classes, labels, embed_own_weights(candidate, pixels),
                                  embed_own_weights(bundle, pixels))
        table = stats.prototypes
        assert table is not None
        data = delta_format.save(stats, key, prototypes_dtype="fp32")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    pushed = push_bytes(data, server, token, policy, name="statistics")
    report.classes = {c: int(n) for c, n in zip(table.classes, table.counts.tolist(), strict=True)}
    report.delta_bytes = len(data)
    report.status = "sent" if pushed.status in (SENT, ALREADY) else pushed.status
    if report.status != "sent":
        report.message = f"the server did not take the statistics: {pushed.code} {pushed.message}"
    return report


def restat_configured(bundle_dir: str | Path | None, config_path: str | Path | None = None, server: str = "",
                      token: str = "", server_key: str = "", device_id: str | None = None,
                      key_hex: str | None = None, policy: RetryPolicy | None = None) -> RestatReport:
    from .provision import load_device_config

    cfg = load_device_config(config_path)
    bundle = bundle_dir or (cfg.bundle if cfg else "")
    if not bundle:
        raise EdgeclError("no bundle folder", "pass BUNDLE_DIR or set bundle in the device config (device init --bundle)")
    return restat(bundle, server or (cfg.server if cfg else ""), token or (cfg.token if cfg else ""),
                  server_key or (cfg.server_key if cfg else ""), device_id, key_hex, cfg, policy)
