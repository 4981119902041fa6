"""The bundle and data B2, B3 and B4 share: the demo's fleet images (calibration classes 0-5, device A's
6-7, device B's 8-9), the bundle `edgecl export` writes from the calibration images (B4 measures that
export; B2 and B3 adapt the same bundle), and device profiles at a fixed thread count.

Everything is written once under benchmarks/out/ and reused by the next script.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.shared import common
from edgecl.datasets import DEMO_GROUPS, write_fashion_groups


def fleet_data(train_per_class: int, test_per_class: int) -> Path:
    """calib / device-a / device-b image folders (edgecl.datasets.DEMO_GROUPS), written once."""
    return write_fashion_groups(common.DATA / f"fleet-{train_per_class}-{test_per_class}", DEMO_GROUPS,
                                train_per_class=train_per_class, test_per_class=test_per_class)


def bundle_path(size: int) -> Path:
    return common.OUT / f"b4-bundle-{size}px"


def ensure_bundle(size: int, train_per_class: int, test_per_class: int) -> Path:
    """The B4 bundle (`edgecl export` with its defaults on the calibration images), exported if absent."""
    out = bundle_path(size)
    if not (out / "manifest.json").exists():
        data = fleet_data(train_per_class, test_per_class)
        common.run_timed([*common.edgecl_cmd(), "export", str(recipe_for_size(size)), "--data",
                          str(data / "calib" / "train"), "-o", str(out), "--overwrite", "--quiet"])
    return out


def device_profile(threads: int, batch_size: int = 32) -> Path:
    """A device profile with a fixed thread count (what B2 compares at)."""
    path = common.OUT / f"device-{threads}t.toml"
    common.OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(f'name = "bench-{threads}-threads"\nthreads = {threads}\nbatch_size = {batch_size}\n'
                    "store_images = false\n")
    return path


def recipe_for_size(size: int) -> Path:
    """The real recipe at another input size (a copy with input_size changed; comments kept)."""
    text = common.RECIPE.read_text()
    if size == 64:
        return common.RECIPE
    out = common.OUT / f"efficientnet_lite0_{size}.toml"
    lines = [f"input_size = [{size}, {size}]" if ln.startswith("input_size") else ln for ln in text.splitlines()]
    # weights_package resolves the weights inside the installed package, so the copy can live anywhere.
    out.write_text("\n".join(lines) + "\n")
    return out
