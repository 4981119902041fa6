"""What the device's file checks cost on `edgecl predict` (docs/device.md "What the device checks").

    python scripts/measure_check_cost.py BUNDLE IMAGE

BUNDLE: an exported bundle that has been adapted once (so a generation is checked too); IMAGE: one
image file. Prints predict's median time (in process, one image) and what hashing the files took.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from edgecl.device import state
from edgecl.device.infer import predict


def median_s(fn: Callable[[], object], n: int = 9) -> float:
    fn()  # warm the page cache and the imports
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(bundle: str, image: str) -> None:
    opened = state.open_bundle(bundle, verify=False)
    whole = median_s(lambda: predict(bundle, [image]))
    read = median_s(lambda: state.verify_files(opened.root, opened.manifest, state.INFERENCE_FILES))
    every = median_s(lambda: state.verify_files(opened.root, opened.manifest))
    head = state.read_head(opened.state_dir)
    gen = head["current"]
    if gen is None:
        sys.exit("adapt the bundle once first: the state's generation is part of what predict checks")
    generation = median_s(lambda: state.read_generation(opened.state_dir / gen, head["meta_sha256"][gen]))
    mb_read = sum((opened.root / n).stat().st_size for n in state.INFERENCE_FILES) / 1e6
    mb_all = sum((opened.root / n).stat().st_size for n in opened.manifest.files) / 1e6
    mb_gen = sum(p.stat().st_size for p in (opened.state_dir / gen).iterdir()) / 1e6
    print(f"predict (1 image, in process, median of 9): {whole * 1000:.0f} ms")
    print(f"  bundle files predict reads, hashed ({mb_read:.1f} MB): {read * 1000:.0f} ms")
    print(f"  state files hashed ({mb_gen:.1f} MB, {gen}): {generation * 1000:.0f} ms")
    print(f"  checks: {(read + generation) * 1000:.0f} ms = {100 * (read + generation) / whole:.0f}% of predict")
    print(f"  (adapt hashes every bundle file, {mb_all:.1f} MB: {every * 1000:.0f} ms)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
