"""The fleet merge over deltas read one at a time: memory bounded independently of the number of devices.

``merge_deltas`` (merge.py) holds every input's values at once, and a robust strategy a
[devices, 65 536] vote block: at 10 000 devices x 167 505 elements that is gigabytes. Here:

1. the weights (``samples_seen``, share cap) and "each device's newest delta" come from what the
   caller knows without decoding (the server's rows);
2. one pass decodes each delta once, in order, and drops it: the weighted mean adds into float64
   sums over K; a robust strategy spills each delta's changed values to one file per block of
   columns (offset uint16 + value float32: 6 bytes per changed element), sized so that one block's
   [devices, columns] votes fit ``memory_bytes``; prototype means spill to one file (float64);
3. a robust strategy then reads one block at a time and reduces its nonzero votes with the same
   ``reduce`` the in-memory merge calls (the zeros of the devices that did not change an element
   are counted, never stored); prototypes are merged class by class from the spill.

Same inputs, same result as ``merge_deltas``, to the bit (tests/test_merge_stream.py compares them
on random inputs for every strategy). Time grows linearly with the devices: each delta is decoded
once and each spilled value read once.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecl.formats.delta import MERGE_DEVICE_ID, Delta
from edgecl.formats.mask import Mask
from edgecl.formats.merge import (
    MAX_SAMPLES_SEEN,
    MergeError,
    MergeOptions,
    MergeOutput,
    SignElected,
    WeightedMean,
    _Coordinatewise,
    capped_shares,
    check_consistent,
    get_strategy,
    newest_per_device,
)
from edgecl.formats.overlap import round_increment
from edgecl.formats.prototypes import Prototypes

DEFAULT_MEMORY_BYTES = 256 << 20     # one block of robust votes, with its sort/partition scratch
_VOTE_BYTES = 40                     # per nonzero vote held in a block: its column and value, sort orders, float64
_MAX_BLOCK_COLUMNS = 65535           # offsets inside a block are uint16
_MAX_BLOCKS = 4096                   # spill files: 2 per block
_BATCH_VALUES = 2 << 20              # changed values gathered before they are split into blocks (~60 MB at the split)

Progress = Callable[[str, int, int], None]   # (phase, done, total)


@dataclass
class StreamInput:
    device_id: str                   # who made it ("each device's newest delta" is decided before decoding)
    samples_seen: int                # its merge weight, as the server recorded it at push
    load: Callable[[], Delta]        # the decoded delta, read when the merge reaches it


def block_columns(devices: int, k: int, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """Columns per block of robust votes so that a block fits ``memory_bytes`` even if every
    device changed every element (a real fleet changes a fraction: the block holds less)."""
    columns = max(1, memory_bytes // (_VOTE_BYTES * max(devices, 1)))
    columns = max(columns, math.ceil(k / _MAX_BLOCKS))
    return int(min(columns, _MAX_BLOCK_COLUMNS, max(k, 1)))


class _Spill:
    """The deltas' changed values by block of columns: b<N>.off (uint16 column within the block)
    and b<N>.val (float32). Values are gathered from many deltas and split by block once per
    ``_BATCH_VALUES``, so the writes do not grow with devices x blocks."""

    def __init__(self, folder: Path, k: int, columns: int) -> None:
        self.k, self.columns, self.folder = k, columns, folder
        self.blocks = max(1, math.ceil(k / columns))
        self.edges = np.arange(0, self.blocks + 1, dtype=np.int64) * columns
        self._positions: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._held = 0

    def add(self, positions: np.ndarray, values: np.ndarray) -> None:
        self._positions.append(np.asarray(positions, np.int64))
        self._values.append(np.asarray(values, np.float32))
        self._held += len(positions)
        if self._held >= _BATCH_VALUES:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        positions, values = np.concatenate(self._positions), np.concatenate(self._values)
        self._positions, self._values, self._held = [], [], 0
        block = positions // self.columns
        order = np.argsort(block, kind="stable")
        positions, values, block = positions[order], values[order], block[order]
        cuts = np.searchsorted(block, np.arange(self.blocks + 1))
        for b in np.flatnonzero(np.diff(cuts)):
            lo, hi = cuts[b], cuts[b + 1]
            with open(self.folder / f"b{b}.off", "ab") as off, open(self.folder / f"b{b}.val", "ab") as val:
                (positions[lo:hi] - self.edges[b]).astype(np.uint16).tofile(off)
                values[lo:hi].tofile(val)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Block b's nonzero votes: (column within the block, value), and its width."""
        start, stop = int(self.edges[b]), min(self.k, int(self.edges[b + 1]))
        off, val = self.folder / f"b{b}.off", self.folder / f"b{b}.val"
        if not off.exists():
            return np.zeros(0, np.uint16), np.zeros(0, np.float32), stop - start
        return np.fromfile(off, np.uint16), np.fromfile(val, np.float32), stop - start


class _PrototypeSpill:
    """Each device's prototype means, appended to one file; classes and counts kept (small)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "prototypes.f64"     # float64: the means as merge_prototypes reads them
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by finish()
        self.rows: dict[str, list[tuple[int, int]]] = {}     # class -> [(row in the file, count)], input order
        self.dims: set[int] = set()
        self.next_row = 0

    def add(self, table: Prototypes | None) -> None:
        if table is None or not len(table):
            return
        means = np.asarray(table.means, np.float64)
        self.dims.add(int(means.shape[1]))
        if len(self.dims) != 1:
            raise MergeError(f"prototypes have different sizes {sorted(self.dims)}", "merge deltas of one bundle only")
        means.tofile(self.file)
        for i, (name, count) in enumerate(zip(table.classes, table.counts, strict=True)):
            self.rows.setdefault(name, []).append((self.next_row + i, int(count)))
        self.next_row += len(table.classes)

    def finish(self, max_share: float | None) -> Prototypes | None:
        """merge.merge_prototypes, class by class from the file (same order, same sums). Rows are
        read one at a time (not memory-mapped: mapped pages count as the process's memory)."""
        self.file.close()
        if not self.rows:
            return None
        dim = next(iter(self.dims))
        names, means = list(self.rows), []
        with open(self.path, "rb") as f:
            def row(i: int) -> np.ndarray:
                f.seek(i * dim * 8)
                return np.frombuffer(f.read(dim * 8), np.float64)

            for name in names:
                counts = np.array([c for _, c in self.rows[name]], np.float64)
                weights = capped_shares(counts, max_share) if max_share is not None else counts / counts.sum()
                means.append(sum(w * row(i) for w, (i, _) in zip(weights, self.rows[name], strict=True)))
        return Prototypes(names, np.stack(means).astype(np.float32),
                          np.array([sum(c for _, c in self.rows[n]) for n in names], np.int64))


def merge_stream(inputs: Sequence[StreamInput], mask: Mask, options: MergeOptions | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, spill_dir: str | Path | None = None,
                 progress: Progress | None = None) -> MergeOutput:
    """``merge_deltas`` over deltas loaded one at a time (see the module docstring); inputs in
    arrival order. ``spill_dir``: where the robust strategies' temporary files go (removed after)."""
    options = options or MergeOptions()
    if not inputs:
        raise MergeError("nothing to merge", "push at least one delta for this bundle first")
    strategy = get_strategy(options.strategy, options.trim)
    counted, superseded = newest_per_device(inputs, lambda x: x.device_id)
    for x in counted:
        if x.samples_seen > MAX_SAMPLES_SEEN:
            raise MergeError(f"delta from {x.device_id} claims {x.samples_seen} samples (over {MAX_SAMPLES_SEEN})",
                             "exclude it (--exclude-delta) or make it again")
    samples = np.array([max(x.samples_seen, 0) for x in counted], np.float64)
    shares = capped_shares(samples, options.max_share) if (samples > 0).all() else np.zeros(len(counted))
    for i, share in enumerate(shares):
        if not (np.isfinite(share) and share > 0):
            raise MergeError(f"delta {i} has weight {share}", "merge only deltas with samples_seen >= 1")
    n, k = len(counted), mask.total_selected
    report = progress or (lambda phase, done, total: None)
    with tempfile.TemporaryDirectory(prefix="edgecl-merge-", dir=spill_dir) as folder:
        robust = isinstance(strategy, _Coordinatewise)
        signed = isinstance(strategy, SignElected)
        if not robust and not signed and not isinstance(strategy, WeightedMean):
            raise MergeError(f"strategy {options.strategy} has no streaming merge", "use weighted-mean, "
                             "ties, trimmed-mean or median")
        sign_sums = np.zeros((4, k) if signed else (4, 0), np.float64)
        spill = _Spill(Path(folder), k, block_columns(n, k, memory_bytes)) if robust else None
        prototypes = _PrototypeSpill(Path(folder))
        weighted_sum = np.zeros(0 if robust else k, np.float64)
        weight_sum = np.zeros(0 if robust else k, np.float64)
        contributors = np.zeros(k, np.int32)
        first: Delta | None = None
        steps = samples_seen = 0
        created = ""
        for row, x in enumerate(counted):
            d = x.load()
            first = first or d
            check_consistent(d, first, k)
            positions = np.asarray(d.changed_positions(), np.int64)
            values = d.values[d.values != 0]
            contributors[positions] += 1
            if spill is not None:
                spill.add(positions, values)
            elif signed:
                SignElected.accumulate(sign_sums, positions, np.asarray(values, np.float64),
                                       np.full(len(positions), float(shares[row]), np.float64))
            else:
                weighted_sum[positions] += float(shares[row]) * np.asarray(values, np.float64)
                weight_sum[positions] += float(shares[row])
            prototypes.add(d.prototypes)
            steps, samples_seen = steps + d.steps, samples_seen + d.samples_seen
            created = max(created, d.created_utc)
            report("reading", row + 1, n)
        if spill is not None:
            spill.flush()
        assert first is not None
        if spill is not None:
            dense = np.zeros(k, np.float32)
            assert isinstance(strategy, _Coordinatewise)
            for b in range(spill.blocks):
                start, stop = int(spill.edges[b]), min(k, int(spill.edges[b + 1]))
                columns, values, width = spill.block(b)
                dense[start:stop] = strategy.reduce(columns, values, n, width)
                report("merging", b + 1, spill.blocks)
            positions_out = np.flatnonzero(dense).astype(np.int32)
            values_out = dense[positions_out].astype(np.float32)
        elif signed:
            dense = SignElected.finish(sign_sums)
            positions_out = np.flatnonzero(dense).astype(np.int32)
            values_out = dense[positions_out]
        else:
            positions_out = np.flatnonzero(contributors).astype(np.int32)
            values_out = (weighted_sum[positions_out] / weight_sum[positions_out]).astype(np.float32)
            dense = np.zeros(k, np.float32)
            dense[positions_out] = values_out
        merged_prototypes = prototypes.finish(options.max_share)
    counts = mask.overlap_vector() + round_increment(dense)
    overlap = {name: (mask.indices[name], counts[sl]) for name, sl in mask.slices().items()}
    shared = int(np.count_nonzero(contributors > 1))
    merged = Delta(bundle_id=first.bundle_id, bundle_version=first.bundle_version, base_sha256=first.base_sha256,
                   mask_sha256=first.mask_sha256, device_id=MERGE_DEVICE_ID, delta_k=k,
                   positions=positions_out, values=values_out, steps=steps, samples_seen=samples_seen,
                   metrics={"deltas": n, "changed": int(positions_out.size), "shared": shared},
                   created_utc=created, prototypes=merged_prototypes)
    return MergeOutput(merged, overlap, shared, [x.device_id for x in counted], superseded)
