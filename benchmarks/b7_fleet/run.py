"""B7, the fleet (docs/benchmarks.md#b7): several devices, one released version.

    .venv/bin/python benchmarks/b7_fleet/run.py --out runs/b7 [--seeds 1993 1994 1995]
        [--train-per-class 100] [--test-per-class 100] [--check-per-class 30] [--epochs 0 (bundle default)]
        [--strategies weighted-mean ties weighted-mean@0.5 median] [--rounds 2] [--tolerance 0.0]
        [--recipe models/efficientnet_lite0.toml]

Fashion-MNIST at 64 px. The bundle v1 knows the calibration classes 0-3; device A adds 4-5, B 6-7,
C 8 and D 9; C and D see everything through their own camera (B6's domains `blur-noise`,
`dim-jpeg`), including images of the calibration classes 0-1 they share. Two rounds: each device
adapts the version it runs on new images, sends its int4 delta; the real release round runs
(`edgecl.release.release` -> each device `edgecl.device.restat.restat` -> `finish`) on a real
server subprocess on loopback; every device pulls the released version.

Arms, per round, on the test images of each class group (calibration; each device's classes, seen
through that device's camera) and overall, with `--head` (default auto: the head the devices serve,
LDA once a state has its statistics; the release gate judges with LDA too, given the calibration
images as --class-data and every device's scatter; `--head ncm` is the cosine-prototype run):
- frozen: the like-for-like frozen baseline (every class's statistics on the current backbone),
  the release gate's own table;
- alone: each device after adapting, on the groups it knows (its own; calibration);
- fleet/<strategy>: the version a round with that merge option would release (phase 2 judged on
  the test images, not published); the first strategy is the shipped one and is published;
- pulled: each device after `pull` of the released version, on every group;
- centralized: one learner adapting the round's version on every device's images (the upper bound).
`--share-exemplars` runs the seed in mode 2 (docs/server.md#exemplars-shared): every delta carries the
device's stored exemplars of its own classes, the release computes their statistics (and scatter)
under the candidate from those images, so no device runs `restat` and phase 1 judges and publishes at
once; the released version ships the fleet's exemplars, so each device replays every class from the
next round on. Each option is scored with `release(publish=False)` on the test images.

Every number comes from the product's own functions; nothing is re-coded here. Results:
OUT/b7.json (every table), OUT/b7.md (the summary table: per round, arm x group).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))                   # the checkout: benchmarks.* (B6's cameras)

from benchmarks.b1_b6_accuracy.domains import render  # noqa: E402
from edgecl.datasets import (  # noqa: E402
    FASHION_CLASSES,
    load_fashion_mnist,
    per_class_subsample,
    write_image_folder,
)

CALIBRATION = [0, 1, 2, 3]
DEVICES: dict[str, tuple[list[int], str]] = {       # name -> (own classes, camera)
    "dev-a": ([4, 5], "clean"), "dev-b": ([6, 7], "clean"),
    "dev-c": ([8], "blur-noise"), "dev-d": ([9], "dim-jpeg")}
SHARED = [0, 1]                                      # calibration classes the camera devices also see
ROUNDS = 2                                           # default; --rounds
SIZE = 64


def _write(root: Path, images: np.ndarray, rows_by_class: dict[int, np.ndarray], camera: str, seed: int) -> Path:
    """root/<class>/<row>.png for the given rows, through ``camera``."""
    pixels, labels = [], []
    for c, rows in rows_by_class.items():
        pixels.append(render(camera, images, rows, seed, SIZE))
        labels.append(np.full(len(rows), c, np.int64))
    px, lab = np.concatenate(pixels), np.concatenate(labels)
    write_image_folder(root, px, lab, FASHION_CLASSES, overwrite=True)
    return root


def write_data(out: Path, seed: int, train: int, test: int, check: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """Disjoint image sets: calibration (export), per device and round its training images, the gate's
    check images, and the test images of every group (device classes through the device's camera)."""
    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    owner = {c: d for d, (cs, _) in DEVICES.items() for c in cs}
    cameras = sum(1 for _, cam in DEVICES.values() if cam != "clean")
    # per class: [calibration] + a set per (round, device that trains on it) + [check]
    need = {c: [train] * (1 + rounds * ((c in owner) + (cameras if c in SHARED else 0))) + [check] for c in range(10)}
    parts = {c: per_class_subsample(tr_y, c, need[c], seed) for c in range(10)}
    test_parts = {c: per_class_subsample(te_y, c, [test], seed) for c in range(10)}
    data: dict[str, Any] = {"calib": _write(out / "calib", tr_x, {c: parts[c][0] for c in CALIBRATION}, "clean", seed)}
    check_rows: dict[str, dict[int, np.ndarray]] = {}
    cursor = {c: 1 for c in range(10)}
    for r in range(rounds):
        for name, (own, camera) in DEVICES.items():
            rows = {c: parts[c][cursor[c]] for c in own}
            for c in own:
                cursor[c] += 1
            if camera != "clean":
                for c in SHARED:
                    rows[c] = parts[c][cursor[c]]
                    cursor[c] += 1
            data[f"{name}/round{r + 1}"] = _write(out / name / f"train-{r + 1}", tr_x, rows, camera, seed + r)
    for c in range(10):
        check_rows.setdefault(DEVICES[owner[c]][1] if c in owner else "clean", {})[c] = parts[c][-1]
    check = out / "check"
    shutil.rmtree(check, ignore_errors=True)
    for camera, rows in check_rows.items():
        tmp = _write(out / f"check-{camera}", tr_x, rows, camera, seed + 7)
        for folder in tmp.iterdir():
            shutil.copytree(folder, check / folder.name)
    groups = {"calibration": _write(out / "test" / "calibration", te_x, {c: test_parts[c][0] for c in CALIBRATION},
                                    "clean", seed + 11)}
    for name, (own, camera) in DEVICES.items():
        groups[name] = _write(out / "test" / name, te_x, {c: test_parts[c][0] for c in own}, camera, seed + 11)
    all_test = out / "test-all"
    shutil.rmtree(all_test, ignore_errors=True)
    for folder in groups.values():
        for cls in folder.iterdir():
            shutil.copytree(cls, all_test / cls.name)
    data.update(check=check, groups=groups, test_all=all_test)
    return data


def _eval_groups(bundle: Path, groups: dict[str, Path], head: str = "auto") -> dict[str, float | None]:
    """Accuracy per group with ``head`` (None: the bundle knows none of its classes)."""
    from edgecl.device.infer import evaluate
    from edgecl.errors import DataError

    out: dict[str, float | None] = {}
    for name, folder in groups.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out[name] = float(evaluate(bundle, folder, head=head, progress=False)["accuracy"])
            except DataError:
                out[name] = None
    return out


def _union(folders: list[Path], dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    for folder in folders:
        for cls in folder.iterdir():
            target = dest / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for img in cls.iterdir():
                shutil.copyfile(img, target / f"{folder.parent.name}-{folder.name}-{img.name}")
    return dest


class Server:
    def __init__(self, store: Path, log: Path) -> None:
        from edgecl.demo import free_port, wait_healthy

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-c", "from edgecl.cli.main import main; main()", "server",
                                      "start", "--port", self.url.rsplit(":", 1)[1], "--store", str(store),
                                      "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def run_seed(out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.deltafile import make_delta
    from edgecl.device.pull import pull
    from edgecl.device.push import push_files
    from edgecl.device.restat import restat
    from edgecl.host.export import ExportOptions, export_bundle
    from edgecl.release import ReleaseOptions, ReleaseReport, finish, release, upload_bundle
    from edgecl.server.store import Store

    data = write_data(out / "data", seed, args.train_per_class, args.test_per_class, args.check_per_class,
                      args.rounds)
    groups: dict[str, Path] = data["groups"]
    v1 = out / "v1"
    shutil.rmtree(v1, ignore_errors=True)
    export_bundle(args.recipe, data["calib"], v1, options=ExportOptions(seed=seed, progress=False, overwrite=True))
    store_dir = out / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store(store_dir)
    creds = {d: store.register_device(d) for d in DEVICES}
    admin, _ = store.register_device("ops", admin=True)
    server_key = store.release_public_key()
    store.close()
    server = Server(store_dir, out / "server.log")
    rounds: list[dict[str, Any]] = []
    try:
        upload_bundle(server.url, admin, v1)
        from edgecl.formats.manifest import load_manifest

        bundle_id = load_manifest(v1).bundle_id
        running = {d: out / d / "bundle.v1" for d in DEVICES}
        for d in DEVICES:
            shutil.rmtree(out / d, ignore_errors=True)
            shutil.copytree(v1, running[d])
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"round": r, "alone": {}, "fleet": {}, "pulled": {}, "statistics_bytes": {},
                                   "delta_bytes": {}}
            for d in DEVICES:
                adapt(running[d], data[f"{d}/round{r}"], AdaptOptions(epochs=args.epochs or None, seed=seed + r,
                                                                      progress=False))
                row["alone"][d] = _eval_groups(running[d], groups, args.head)
                delta = out / d / f"delta-{r}.safetensors"
                rep = make_delta(running[d], delta, device_id=d, key_hex=creds[d][1],
                                 share_exemplars=args.share_exemplars)
                row["delta_bytes"][d] = rep.bytes
                row.setdefault("shared_exemplars", {})[d] = rep.exemplars
                push_files([delta], server.url, creds[d][0])
            # The other merge options are scored first (judged on the test images, not published): the
            # shipped one (the first) then publishes, and the next round starts from it.
            for strategy in [*args.strategies[1:], args.strategies[0]]:
                shipped = strategy == args.strategies[0]
                # "ties@0.5": the ties merge, half its step; "ties+c3": then 3 epochs of consolidation on the
                # fleet's exemplars (mode 2 only: `edgecl release --consolidate 3`)
                spec, _, epochs = strategy.partition("+c")
                name, _, scale = spec.partition("@")
                # The calibration images (the export's folder) give the current classes' statistics and
                # scatter under the candidate; with `--head ncm` the gate judges with ncm as before.
                options = ReleaseOptions(heldout=data["check"], strategy=name, scale=float(scale or 1.0),
                                         work_dir=out / f"release-{r}-{strategy}", class_data=data["calib"],
                                         head="ncm" if args.head == "ncm" else "auto", tolerance=args.tolerance,
                                         consolidate_epochs=int(epochs or 0), ask_shared=args.ask_shared)
                scored: ReleaseReport
                if args.share_exemplars and not args.ask_shared:
                    # Mode 2: one phase. Scored on the test images without publishing, then the shipped
                    # option judged on the check images and published.
                    scored = release(bundle_id, server.url, admin, ReleaseOptions(
                        **{**vars(options), "heldout": data["test_all"], "publish": False,
                           "work_dir": out / f"score-{r}-{strategy}"}))
                    row.setdefault("gate_head", {})[strategy] = scored.head
                    row["fleet"][strategy] = {g: v["candidate"] for g, v in scored.groups.items()}
                    row["frozen"] = {g: v["baseline"] for g, v in scored.groups.items()}
                    row["current"] = {g: v["current"] for g, v in scored.groups.items()}
                    row.setdefault("statistics_sources", {})[strategy] = scored.statistics
                    if scored.consolidation:
                        row.setdefault("consolidation", {})[strategy] = scored.consolidation
                    if shipped:
                        final = release(bundle_id, server.url, admin, options)
                        row["released"] = {"published": final.published, "reasons": final.reasons,
                                           "groups": final.groups}
                    continue
                phase1 = release(bundle_id, server.url, admin, options)
                if not phase1.published:
                    row["fleet"][strategy] = {"refused_in_phase_1": phase1.reasons}
                    continue
                for d in DEVICES:
                    sent = restat(running[d], server.url, creds[d][0], server_key, d, creds[d][1])
                    row["statistics_bytes"][d] = sent.delta_bytes
                scored = finish(bundle_id, server.url, admin, ReleaseOptions(
                    heldout=data["test_all"], publish=False, work_dir=out / f"score-{r}-{strategy}",
                    class_data=data["calib"], head=options.head))
                row.setdefault("gate_head", {})[strategy] = scored.head
                row["fleet"][strategy] = {g: v["candidate"] for g, v in scored.groups.items()}
                row["frozen"] = {g: v["baseline"] for g, v in scored.groups.items()}
                row["current"] = {g: v["current"] for g, v in scored.groups.items()}
                row.setdefault("statistics_sources", {})[strategy] = {**scored.statistics,
                                                                     "estimated": scored.estimated}
                if shipped:   # --finish repeats the consolidation phase 1 recorded (never asked for again)
                    final = finish(bundle_id, server.url, admin, dataclasses.replace(options, consolidate_epochs=None))
                    row["released"] = {"published": final.published, "reasons": final.reasons,
                                       "groups": final.groups}
            if row.get("released", {}).get("published"):
                for d in DEVICES:
                    report = pull(running[d], server.url, creds[d][0], server_key)
                    running[d] = Path(report.bundle_dir)
                    row["pulled"][d] = {"groups": _eval_groups(running[d], groups, args.head),
                                        "chose": report.upgrade.get("chose")}
            # centralized: one learner that saw every device's images, round after round
            central = out / "central"
            if r == 1:
                shutil.rmtree(central, ignore_errors=True)
                shutil.copytree(v1, central)
            union = _union([data[f"{d}/round{r}"] for d in DEVICES], out / f"union-{r}")
            adapt(central, union, AdaptOptions(epochs=args.epochs or None, seed=seed + r, progress=False))
            row["centralized"] = _eval_groups(central, groups, args.head)
            row["seconds"] = time.perf_counter() - t0
            rounds.append(row)
            print(json.dumps({"seed": seed, **{k: row[k] for k in ("round", "frozen", "fleet", "centralized")
                                               if k in row}}, default=str), flush=True)
    finally:
        server.stop()
    return {"seed": seed, "rounds": rounds}


def _groups_of(row: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Every arm of one round as {arm: {group: accuracy}} (group names: calibration, dev-x)."""
    def clean(table: dict[str, Any] | None) -> dict[str, float | None]:
        return {g.removeprefix("device:"): v for g, v in (table or {}).items() if not isinstance(v, list)}

    arms: dict[str, dict[str, float | None]] = {"frozen": clean(row.get("frozen")),
                                                "current version": clean(row.get("current"))}
    for strategy, table in row.get("fleet", {}).items():
        arms[f"fleet/{strategy}"] = clean(table)
    for d, table in row.get("alone", {}).items():
        arms[f"{d} alone"] = {g: table.get(g) for g in ("calibration", d)}
    for d, pulled in row.get("pulled", {}).items():
        arms[f"{d} after pull"] = dict(pulled["groups"])
    arms["centralized"] = dict(row.get("centralized") or {})
    return arms


def summary(results: dict[str, Any]) -> str:
    """The markdown table: per round, arm x group (mean over seeds, spread when several)."""
    head = results.get("args", {}).get("head", "ncm")     # runs before --head existed were ncm
    mode = "mode 2, shared exemplars" if results.get("args", {}).get("share_exemplars") == "True" else "mode 1"
    if results.get("args", {}).get("ask_shared") == "True":
        mode += ", devices asked (--ask-shared)"
    lines = [f"# B7 fleet ({mode}): accuracy (%) per class group, {'ncm' if head == 'ncm' else 'served (LDA)'} head",
             ""]
    seeds = results["seeds"]
    for r in range(max((len(s["rounds"]) for s in seeds), default=0)):
        per_seed = [_groups_of(s["rounds"][r]) for s in seeds if len(s["rounds"]) > r]
        if not per_seed:
            continue
        groups = ["calibration", *DEVICES]
        released = [s["rounds"][r].get("released", {}) for s in seeds if len(s["rounds"]) > r]
        lines += [f"## round {r + 1} (released: {', '.join(str(x.get('published')) for x in released)})", "",
                  "| arm | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for arm in per_seed[0]:
            cells = []
            for g in groups:
                vals = [a[arm].get(g) for a in per_seed if arm in a and a[arm].get(g) is not None]
                cells.append("-" if not vals else f"{100 * float(np.mean(vals)):.1f}"
                             + (f" ± {100 * float(np.std(vals)):.1f}" if len(vals) > 1 else ""))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        for x in released:
            if x.get("reasons"):
                lines.append(f"\nrefused: {'; '.join(x['reasons'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--check-per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=0, help="device epochs (0: the bundle's default)")
    ap.add_argument("--strategies", nargs="+", default=["ties", "weighted-mean", "ties@0.5", "weighted-mean@0.5"],
                    help="merge options, the first shipped; NAME, NAME@SCALE (the release's --scale), "
                         "NAME+cEPOCHS (--consolidate EPOCHS; with --share-exemplars)")
    ap.add_argument("--head", choices=["auto", "ncm"], default="auto",
                    help="auto: the head the devices serve (LDA after adapt) and the gate's LDA; ncm: cosine "
                         "prototypes")
    ap.add_argument("--share-exemplars", action="store_true",
                    help="mode 2: devices share their exemplars of their own classes (profile share_exemplars)")
    ap.add_argument("--ask-shared", action="store_true",
                    help="with --share-exemplars: every release also asks the devices for their statistics "
                         "(edgecl release --ask-shared; two phases, `restat` on every device)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="release rounds (each device adapts on new images)")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="the release gate's allowed drop per group (edgecl release --tolerance; 0: none)")
    ap.add_argument("--recipe", type=Path, default=REPO / "models" / "efficientnet_lite0.toml")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "seeds": [run_seed(args.out / f"seed-{s}", s, args) for s in args.seeds]}
    (args.out / "b7.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "b7.md").write_text(summary(results))
    print(summary(results))
    print(f"wrote {args.out / 'b7.json'} and {args.out / 'b7.md'}")


if __name__ == "__main__":
    main()
