"""Which LDA covariance should a device serve after `edgecl pull`? (issue 21: "each device keeps its
own classes within 1 point of before the pull").

After the demo's pull each device serves the release's fleet head: the released class means and the
pooled within-class scatter of every class under v2 (``fleet_scatter.safetensors``). Its own head
before the pull weighted its own classes (300 images each) over the others. This scores, on the
demo's test images embedded under v2, the released means with each covariance a device could serve:

- served (fleet): what `pull` installs today;
- own held, under v2: the scatter of every image the device holds (its task folder and exemplars,
  ``restat.held_images``) recomputed under v2: the device's own weighting;
- fleet + own held: both scatters pooled (the device's images counted twice);
- old own: the device's LDA scatter before the pull, not moved.

And, for reference, the device before the pull (its own state, its own classes only).

    .venv/bin/edgecl demo --out demo-out
    .venv/bin/python benchmarks/analyses/demo_pull_head.py demo-out      # about a minute on 2 cores

Writes benchmarks/out/demo_pull_head.json (kept as benchmarks/results/demo_pull_head.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import create_runner, embed_and_score, embed_own_weights, resolve_profile
    from edgecl.device.restat import held_images
    from edgecl.device.state import load_current, open_bundle
    from edgecl.formats.images import load_image_folder
    from edgecl.formats.scatter import DEFAULT_SHRINKAGE, class_scatter, covariance
    from edgecl.formats.scoring import score

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "demo-out"
    request = json.loads((root / "data" / "dataset.json").read_text())["request"]["groups"]
    test = None
    out: dict[str, Any] = {"demo": str(root), "devices": {}}

    def by_group(s: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, float | None]:
        row: dict[str, float | None] = {"overall": round(100 * s["accuracy"], 1)}
        for g, cs in groups.items():
            have = [s["per_class"][c]["accuracy"] for c in cs if c in s["per_class"]]
            row[g] = round(100 * float(np.mean(have)), 1) if have else None
        return row

    for device in ("device-a", "device-b"):
        old, new = open_bundle(root / device / "bundle"), open_bundle(root / device / "bundle-v2")
        before, after = load_current(old), load_current(new)
        m = new.manifest
        if test is None:
            test = load_image_folder(root / "data" / "test-all", m.input_size, m.interpolation, progress=False)
        truth = [test.classes[i] for i in test.labels]
        groups = {g: [c for c in test.classes if int(c.split("-")[0]) in ids] for g, ids in request.items()}
        under_v2 = embed_own_weights(new, test.pixels)
        served, own_old = LdaHead.load_file(after.lda_path), LdaHead.load_file(before.lda_path)
        classes, pixels, labels = held_images(old, before)
        scatter, count, n_groups = class_scatter(embed_own_weights(new, pixels).astype(np.float64), labels)
        covariances = {
            "served (fleet)": served.covariance(),
            "own held, under v2": covariance(scatter, count, n_groups, DEFAULT_SHRINKAGE),
            "fleet + own held": covariance(served.scatter + scatter, served.count + count, served.groups + n_groups,
                                           DEFAULT_SHRINKAGE),
            "old own (not moved)": own_old.covariance()}
        rows = {name: by_group(score(under_v2, truth, after.prototypes, cov), groups) for name, cov in covariances.items()}
        runner = create_runner(old, resolve_profile(None, old))
        under_old = embed_and_score(runner, old, test.pixels, before.delta)[0]
        rows["before the pull (own state, own classes)"] = by_group(
            score(under_old, truth, before.prototypes, own_old.covariance()), groups)
        out["devices"][device] = {"held_images": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
                                  "rows": rows}
        print(f"{device} (holds {len(labels)} images of {', '.join(classes)})")
        print("| covariance | overall | " + " | ".join(groups) + " |")
        print("|---|---|" + "---|" * len(groups))
        for name, row in rows.items():
            print(f"| {name} | " + " | ".join("-" if row[k] is None else f"{row[k]:.1f}"
                                               for k in ["overall", *groups]) + " |")
    dest = REPO / "benchmarks" / "out" / "demo_pull_head.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
