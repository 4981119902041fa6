"""`edgecl demo`: the whole host -> device -> fleet loop on real parts, in about ten minutes on 2 cores.

1. data    Fashion-MNIST written as image folders: classes 0-5 are what the model "had before"
           (calibration), classes 6-7 are new on device A, 8-9 new on device B (edgecl.datasets).
2. export  `edgecl export` of the ImageNet-pretrained EfficientNet-Lite0 recipe on the calibration images.
3. server  `edgecl server start` on a free loopback port; each device registered (token + signing key); the
           bundle added.
4. devices the "before" row: a copy of the bundle given the device's new classes by `edgecl adapt
           --epochs 0` (the frozen backbone + their prototypes), `edgecl eval`; then each device's own
           copy of the bundle runs, as a device would, `edgecl adapt` (MIST: drop-gated sparse tuning
           with the bundle's defaults and the do-no-harm gate), `edgecl eval`, `edgecl delta`, `edgecl push`.
5. release `edgecl release` with an operator's admin token (docs/server.md, the release round): the
           server merges the devices' deltas (weighted by samples seen), the host applies the merge ->
           candidate v2 and checks it among v1's classes against v1; each device runs `edgecl restat`
           (its classes' statistics under v2's backbone, from the images it holds: kilobytes);
           `edgecl release --finish` sums them, and v2 is signed and published only if no class
           group is worse than the frozen baseline and v1's classes no worse than in v1, on the
           operator's release-check images (150 per class, never trained on, not the report's test
           images). Then `edgecl eval` of v2 and of the exact like-for-like baseline (v1 + every
           class's prototype from all its images) on the test images.
6. pull    if v2 was released, each device is evaluated on every class group it knows, runs `edgecl
           pull` (the signature checked against the pinned server key; its memory carried; for its own
           classes it keeps v2's statistics or its own, whichever scores better on the images it
           holds) and is evaluated on every class group again. If it was refused, `edgecl pull`
           finds nothing newer and each device keeps v1 with its own adaptation.
7. report  a table of accuracy per stage on the old classes and each device's classes, delta sizes,
           step time and peak memory; a PNG plot; summary.json.

Every device-side step is a subprocess of the `edgecl` CLI (no torch is imported in those processes).
Nothing here computes a result itself: every number comes from the commands' own output.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError

RECIPE = Path(__file__).resolve().parent.parent / "models" / "efficientnet_lite0.toml"
DEVICES = ("device-a", "device-b")
DELTA_VALUES = "int4"  # what a device on a slow plant network sends: < 1% of the model (B3)


@dataclass
class DemoOptions:
    out: Path = Path("demo-out")        # everything goes here (data, bundles, server store, report)
    fast: bool = False                  # fewer images and one epoch: a smoke run in ~3-4 minutes
    train_per_class: int = 0            # 0 = preset (300 full / 100 fast)
    test_per_class: int = 0             # 0 = preset (200 full / 60 fast)
    check_per_class: int = 0            # the operator's release-check images per class; 0 = preset (150 / 40)
    epochs: int = 0                     # device epochs; 0 = the bundle's default (1 with --fast)
    threads: int = 0                    # onnxruntime threads per device process; 0 = its default
    recipe: Path = RECIPE               # the embedded default: ImageNet-pretrained EfficientNet-Lite0
    fresh: bool = False                 # remove OUT first (else the data folders are reused)
    # Mode 2 (docs/server.md#exemplars-shared): both devices' profiles share their exemplars; the
    # release consolidates the merged step on the fleet's exemplars and asks the devices (--ask-shared).
    share_exemplars: bool = False

    def resolved(self) -> DemoOptions:
        d = asdict(self)
        d["train_per_class"] = self.train_per_class or (100 if self.fast else 300)
        d["test_per_class"] = self.test_per_class or (60 if self.fast else 200)
        # 150: a device group's 300 images tell a 1-point difference from noise better than 100 did
        # (the 2026-12-06 demo was refused by one image of 100 on device B's classes).
        d["check_per_class"] = self.check_per_class or (40 if self.fast else 150)
        d["epochs"] = self.epochs or (1 if self.fast else 0)  # 0: `edgecl adapt` takes the bundle's default
        return DemoOptions(**d)


@dataclass
class Stage:
    name: str
    device: str
    accuracy: dict[str, float]          # group -> accuracy in % (old classes, device-a's, device-b's)
    note: str = ""


@dataclass
class DemoReport:
    stages: list[Stage] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bundle: dict[str, Any] = field(default_factory=dict)
    release: dict[str, Any] = field(default_factory=dict)   # edgecl release's verdict and group table


# -- processes -------------------------------------------------------------------------------------
def edgecl_cmd() -> list[str]:
    script = Path(sys.executable).with_name("edgecl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgecl.cli.main"]


class Runner:
    """Runs `edgecl` subcommands: progress (stderr) goes to the terminal, stdout is returned."""

    def __init__(self, echo: Callable[[str], None], env: dict[str, str]) -> None:
        self.echo, self.env = echo, env

    def __call__(self, *args: str, show_stdout: bool = False, ok: tuple[int, ...] = (0,)) -> str:
        cmd = [*edgecl_cmd(), *args]
        # Show the command a user would type, but never a device's token or signing key.
        shown = ["***" if i and args[i - 1] in ("--token", "--key") else a for i, a in enumerate(args)]
        self.echo(f"  $ edgecl {' '.join(shown)}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=self.env)
        if show_stdout and proc.stdout.strip():
            self.echo("    " + proc.stdout.strip().replace("\n", "\n    "))
        if proc.returncode not in ok:
            raise EdgeclError(f"`edgecl {args[0]}` failed (exit {proc.returncode}): {proc.stdout.strip()[-500:]}",
                              "see the message above; rerun `edgecl demo` once it is fixed")
        return proc.stdout

    def json(self, *args: str, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
        out = self(*args, ok=ok)
        return json.loads(out[out.index("{"):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgeclError(f"`edgecl server start` exited with {proc.returncode}", "see its log in OUT/server.log")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise EdgeclError(f"the server at {url} did not answer within {timeout_s:.0f} s", "see OUT/server.log")


# -- stages ----------------------------------------------------------------------------------------
def _accuracy(run: Runner, bundle: Path, folder: Path) -> tuple[float, int]:
    # The head the device serves (`--head auto`): LDA once a state has its statistics (every adapt makes
    # them; a pulled release ships the fleet's), ncm for the exported bundle, which has none yet. Best
    # against best: the frozen baseline is scored with its LDA head too.
    r = run.json("eval", str(bundle), "--data", str(folder), "--head", "auto", "--json")
    return 100.0 * float(r["accuracy"]), int(r["images"])


def _fleet_row(report: dict, key: str) -> dict[str, float]:
    """A release report's per-group accuracies (``candidate`` or ``baseline``) as the table's columns."""
    names = {"calibration": "old classes", **{f"device:{d}": f"{d} classes" for d in DEVICES}}
    return {names[g]: 100.0 * row[key] for g, row in report["groups"].items() if g in names and row[key] is not None}


def _parse_registration(text: str) -> tuple[str, str]:
    fields = dict(line.split(None, 1) for line in text.splitlines() if line.startswith(("token", "key")))
    return fields["token"].strip(), fields["key"].strip()


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> DemoReport:  # noqa: C901
    opts = options.resolved()
    out = Path(opts.out).resolve()
    if opts.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport()
    env = {**os.environ, "EDGECL_OUTBOX": str(out / "outbox")}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    run = Runner(echo, env)
    t_start = time.perf_counter()

    def stage(title: str) -> float:
        echo(f"\n[{time.perf_counter() - t_start:6.0f} s] {title}")
        return time.perf_counter()

    # 1. data ----------------------------------------------------------------------------------------
    t = stage(f"1/7 data: Fashion-MNIST -> image folders ({opts.train_per_class} train / {opts.test_per_class} "
              "test per class)")
    from edgecl.datasets import DEMO_GROUPS, FASHION_CLASSES, write_fashion_groups
    data = write_fashion_groups(out / "data", DEMO_GROUPS, train_per_class=opts.train_per_class,
                                test_per_class=opts.test_per_class, val_per_class=opts.check_per_class,
                                overwrite=True)
    # The operator's release check: images of every class that no device trains on and the report's
    # test images are not (the "val" split: other training-file images), one folder per class.
    check = data / "release-check"
    shutil.rmtree(check, ignore_errors=True)
    for group in DEMO_GROUPS:
        for folder in sorted((data / group / "val").iterdir()):
            shutil.copytree(folder, check / folder.name)
    # Every test image in one folder: the release scores its candidate and frozen baseline on them too
    # (judge only), like for like with the fleet's statistics, on images no step and no check used.
    test_all = data / "test-all"
    shutil.rmtree(test_all, ignore_errors=True)
    for group in DEMO_GROUPS:
        for folder in sorted((data / group / "test").iterdir()):
            shutil.copytree(folder, test_all / folder.name)
    for group, classes in DEMO_GROUPS.items():
        echo(f"  {group}: {', '.join(FASHION_CLASSES[c] for c in classes)}")
    groups = {"old classes": data / "calib" / "test", "device-a classes": data / "device-a" / "test",
              "device-b classes": data / "device-b" / "test"}
    report.timings_s["data"] = time.perf_counter() - t
    profile = out / "device.toml"
    profile.write_text(f'name = "demo-device"\nthreads = {opts.threads}\nbatch_size = 32\n'
                       + ("share_exemplars = true\n" if opts.share_exemplars else ""))

    # 2. export --------------------------------------------------------------------------------------
    t = stage("2/7 host: edgecl export (MI-Fisher scores on the calibration images, 5% mask, train_step.onnx + "
              "inference.onnx)")
    bundle_v1 = out / "bundle-v1"
    run("export", str(opts.recipe), "--data", str(data / "calib" / "train"), "-o", str(bundle_v1), "--overwrite",
        *(["--epochs", str(opts.epochs)] if opts.epochs else []), show_stdout=True)
    manifest = json.loads((bundle_v1 / "manifest.json").read_text())
    report.bundle = {"bundle_id": manifest["bundle_id"], "total_params": manifest["total_params"],
                     "selected": manifest["selected"], "base_fp32_bytes": 4 * manifest["total_params"]}
    report.timings_s["export"] = time.perf_counter() - t
    base = {name: _accuracy(run, bundle_v1, folder)[0] for name, folder in groups.items()
            if name == "old classes"}
    report.stages.append(Stage("exported", "-", base, "bundle v1: calibration prototypes only"))

    # 3. server --------------------------------------------------------------------------------------
    t = stage("3/7 fleet: edgecl server start on loopback; register the devices; add the bundle")
    store = out / "server"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out / "outbox", ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "w")  # noqa: SIM115 - lives as long as the server process
    server = subprocess.Popen([*edgecl_cmd(), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--store",
                               str(store), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, server)
        echo(f"  server up at {url} (store {store})")
        creds = {d: _parse_registration(run("server", "device", "add", d, "--store", str(store))) for d in DEVICES}
        operator, _ = _parse_registration(run("server", "device", "add", "operator", "--admin", "--store", str(store)))
        server_key = run("server", "key", "--store", str(store)).strip()   # what devices pin to verify releases
        run("server", "bundle", "add", str(bundle_v1), "--store", str(store), show_stdout=True)
        report.timings_s["server"] = time.perf_counter() - t

        # 4. devices ---------------------------------------------------------------------------------
        for i, device in enumerate(DEVICES):
            t = stage(f"4/7 {device} ({i + 1}/{len(DEVICES)}): frozen prototypes, MIST adapt, delta, push")
            own = f"{device} classes"
            bundle = out / device / "bundle"
            shutil.rmtree(bundle.parent, ignore_errors=True)
            shutil.copytree(bundle_v1, bundle)
            train = data / device / "train"
            # "before": a copy of v1 given the new classes without training. A copy, so that the adapt
            # below starts from v1 and its gate judges on images no statistics count yet.
            before = out / device / "frozen"
            shutil.copytree(bundle_v1, before)
            run.json("adapt", str(before), "--data", str(train), "--epochs", "0", "--device", str(profile), "--json")
            frozen = {g: _accuracy(run, before, groups[g])[0] for g in ("old classes", own)}
            report.stages.append(Stage("frozen + new prototypes", device, frozen, "adapt --epochs 0 (a copy of v1)"))
            adapted = run.json("adapt", str(bundle), "--data", str(train), "--device", str(profile),
                               *(["--epochs", str(opts.epochs)] if opts.epochs else []), "--json")
            echo(f"    {adapted['steps']} steps, {adapted['step_seconds_median']:.2f} s/step, changed "
                 f"{100 * adapted['changed_fraction_mean']:.3f}% of weights per step, peak {adapted['peak_rss_mb']:.0f} MB")
            after = {g: _accuracy(run, bundle, groups[g])[0] for g in ("old classes", own)}
            kept = adapted.get("kept", "adapted")
            gate = adapted.get("gate") or {}
            kept_epochs = adapted.get("kept_epochs", adapted["epochs"])
            note = (f"{adapted['epochs']} epochs on device" + (f", gate kept epoch {kept_epochs}"
                                                                if kept_epochs != adapted["epochs"] else "")
                    if kept == "adapted" else
                    f"gate kept prototypes only (held out {gate.get('adapted_accuracy', 0):.3f} adapted vs "
                    f"{gate.get('prototypes_only_accuracy', 0):.3f})")
            report.stages.append(Stage("after MIST adapt", device, after, note))
            delta_path = out / device / "delta.safetensors"
            token, key = creds[device]
            run("delta", str(bundle), "-o", str(delta_path), "--values", DELTA_VALUES, "--device-id", device,
                "--key", key, *(["--share-exemplars"] if opts.share_exemplars else []), show_stdout=True)
            run("push", str(delta_path), "--server", url, "--token", token, show_stdout=True)
            report.devices[device] = {
                "steps": adapted["steps"], "step_s_median": adapted["step_seconds_median"],
                "peak_rss_mb": adapted["peak_rss_mb"], "changed_fraction_mean": adapted["changed_fraction_mean"],
                "delta_bytes": delta_path.stat().st_size, "delta_values": DELTA_VALUES}
            report.timings_s[device] = time.perf_counter() - t
        # 5. release round -----------------------------------------------------------------------------
        t = stage("5/7 fleet: edgecl release (the server merges the devices' deltas -> candidate v2 -> the devices "
                  "send their classes' statistics under it -> judged -> published only if no group is worse)")
        shutil.rmtree(out / "release", ignore_errors=True)     # no bundle of an earlier run is taken for v2
        # --class-data: the host holds the images v1's classes were exported from, so their statistics
        # under the candidate are exact too (without it they are moved by their exemplars' drift).
        gate = ["release", manifest["bundle_id"], "--heldout", str(check), "--server", url, "--token", operator,
                "--bundle", str(bundle_v1), "--class-data", str(data / "calib" / "train"), "--work",
                str(out / "release"), "--json"]
        # mode 2: the release consolidates on the shared exemplars and still asks both devices for their
        # classes' statistics of every image they hold (not of their 20 exemplars a class)
        released = run.json(*gate, *(["--ask-shared"] if opts.share_exemplars else []), ok=(0, 2))
        if released.get("consolidation"):
            c = released["consolidation"]
            echo(f"    consolidated: {c['epochs']} epochs, {c['steps']} steps on {c['images']} shared exemplars")
        if released["stage"] == "candidate":
            for device in DEVICES:
                sent = run.json("restat", str(out / device / "bundle"), "--server", url, "--token", creds[device][0],
                                "--server-key", server_key, "--key", creds[device][1], "--device-id", device,
                                "--json")
                echo(f"    {device}: {sent['status']} {sent.get('classes', {})} ({sent.get('delta_bytes', 0):,} B)")
                report.devices.setdefault(device, {})["statistics_bytes"] = sent.get("delta_bytes", 0)
            # Judge only, on the test images: the release's own like-for-like table (v2 and the frozen v1,
            # each with every class's statistics and scatter under its backbone, the LDA head).
            on_test = run.json(*[a if a != str(check) else str(test_all) for a in gate], "--finish", "--no-publish",
                               ok=(0, 2))
            released = run.json(*gate, "--finish", ok=(0, 2))
            report.stages.append(Stage("frozen baseline (v1)", "fleet", _fleet_row(on_test, "baseline"),
                                       "like for like: v1, the release's statistics of all 10 classes"))
            if not released["published"]:
                report.stages.append(Stage("candidate v2", "fleet", _fleet_row(on_test, "candidate"),
                                           "refused; the release's statistics of all 10 classes"))
        shutil.rmtree(out / "bundle-v2", ignore_errors=True)
        if released["published"]:
            shutil.copytree(out / "release" / "release", out / "bundle-v2")
        report.bundle["merged_delta_bytes"] = (out / "release" / f"delta-{released['merge']['sha256'][:16]}"
                                               ".safetensors").stat().st_size
        report.release = {k: released.get(k) for k in ("passed", "published", "reasons", "groups", "not_judged",
                                                       "statistics", "head", "consolidation")}
        verdict = ("released: every class group at least the frozen baseline on the release-check images, the "
                   "old classes at least v1" if released["published"] else "refused: " + "; ".join(released["reasons"]))
        echo(f"  v2 {verdict}")
        # The like-for-like baseline, exact: bundle v1, no training, every class's prototype from all its
        # images (what the devices would have computed without adapting).
        baseline = out / "baseline" / "bundle"
        shutil.rmtree(baseline.parent, ignore_errors=True)
        shutil.copytree(bundle_v1, baseline)
        for device in DEVICES:
            run.json("adapt", str(baseline), "--data", str(data / device / "train"), "--epochs", "0", "--device",
                     str(profile), "--json")
        accuracy_base = {g: _accuracy(run, baseline, f)[0] for g, f in groups.items()}
        report.stages.append(Stage("frozen, all classes", "one", accuracy_base,
                                   "no training; one device given all 10 classes (adapt --epochs 0)"))
        if released["published"]:
            accuracy_v2 = {g: _accuracy(run, out / "bundle-v2", f)[0] for g, f in groups.items()}
            report.stages.append(Stage("released v2", "fleet", accuracy_v2,
                                       "published; a fresh install (the statistics and scatter v2 ships)"))
        report.timings_s["release"] = time.perf_counter() - t

        # 6. pull back ----------------------------------------------------------------------------------
        if released["published"]:
            t = stage("6/7 devices pull v2: edgecl pull (signature checked; the device's memory carried; for its own "
                      "classes it keeps v2's statistics or its own, whichever scores better on the images it holds)")
            for device in DEVICES:
                mine = out / device / "bundle-v2"
                shutil.rmtree(mine, ignore_errors=True)
                # Before: v1 with the device's own adaptation knows the old classes and its own (the other
                # device's classes are unknown to it: "-" in the table).
                pre_pull = {g: _accuracy(run, out / device / "bundle", groups[g])[0]
                          for g in ("old classes", f"{device} classes")}
                report.stages.append(Stage("before the pull (v1)", device, pre_pull, "the device's own adaptation"))
                pulled = run.json("pull", str(out / device / "bundle"), "--out", str(mine), "--server", url,
                                  "--token", creds[device][0], "--server-key", server_key, "--json")
                chose = (pulled.get("upgrade") or {}).get("chose") or {}
                accuracy = {g: _accuracy(run, mine, groups[g])[0] for g in groups}
                report.stages.append(Stage("after the pull (v2)", device, accuracy,
                                           "edgecl pull; own classes: "
                                           + (f"kept the {chose['kept']} statistics" if chose else "from v2")))
            report.timings_s["pull"] = time.perf_counter() - t
        else:
            stage("6/7 devices pull: nothing released, each device keeps v1 with its own adaptation")
            for device in DEVICES:
                answer = run("pull", str(out / device / "bundle"), "--out", str(out / device / "bundle-v2"),
                             "--server", url, "--token", creds[device][0], "--server-key", server_key)
                echo("    " + answer.strip())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    # 7. report ----------------------------------------------------------------------------------------
    stage("7/7 report")
    report.timings_s["total"] = time.perf_counter() - t_start
    echo(format_table(report))
    (out / "summary.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    plot(report, out / "accuracy.png")
    echo(f"\nwrote {out / 'summary.json'} and {out / 'accuracy.png'}; total {report.timings_s['total']:.0f} s")
    return report


def format_table(report: DemoReport) -> str:
    cols = ["old classes", "device-a classes", "device-b classes"]
    lines = ["", "accuracy (%) per stage over every class known at that stage, with the head the device serves "
                 "(LDA once a state has its statistics; the exported bundle: cosine prototypes)",
             f"{'stage':<26} {'device':<9} " + " ".join(f"{c:>17}" for c in cols) + "  note"]
    for s in report.stages:
        cells = " ".join(f"{s.accuracy[c]:>17.1f}" if c in s.accuracy else f"{'-':>17}" for c in cols)
        lines.append(f"{s.name:<26} {s.device:<9} {cells}  {s.note}")
    base = report.bundle.get("base_fp32_bytes", 0)
    lines += ["", f"{'device':<9} {'steps':>6} {'s/step':>7} {'changed/step':>13} {'peak MB':>8} "
                  f"{'delta bytes':>12} {'of base fp32':>13}  values"]
    for name, d in report.devices.items():
        lines.append(f"{name:<9} {d['steps']:>6} {d['step_s_median']:>7.2f} {100 * d['changed_fraction_mean']:>12.3f}% "
                     f"{d['peak_rss_mb']:>8.0f} {d['delta_bytes']:>12,} {100 * d['delta_bytes'] / base:>12.2f}%  "
                     f"{d['delta_values']}")
    if "merged_delta_bytes" in report.bundle:
        lines.append(f"merged delta: {report.bundle['merged_delta_bytes']:,} bytes "
                     f"({100 * report.bundle['merged_delta_bytes'] / base:.2f}% of the base model's {base:,} fp32 bytes)")
    if report.release:
        def pct(x: float | None) -> str:
            return f"{100 * x:>9.1f}" if x is not None else f"{'-':>9}"

        head = (report.release.get("head") or {}).get("name", "ncm")
        lines += ["", f"edgecl release on the release-check images ({head} head; " +
                  ("published" if report.release["published"] else "refused, nothing published") + ")",
                  f"{'group':<18} {'images':>6} {'v2':>9} {'frozen':>9} {'v1':>9} {'v2 among v1 classes':>20}"]
        for name, g in report.release["groups"].items():
            lines.append(f"{name:<18} {g['images']:>6} {pct(g['candidate'])} {pct(g['baseline'])} {pct(g['current'])} "
                         f"{pct(g.get('candidate_current_classes')):>20}")
    lines.append("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timings_s.items()))
    return "\n".join(lines)


def plot(report: DemoReport, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # matplotlib is a dev extra; the table and summary.json hold the same numbers
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["old classes", "device-a classes", "device-b classes"]
    labels = [f"{s.name}\n({s.device})" for s in report.stages]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for j, c in enumerate(cols):
        xs = [i + (j - 1) * width for i, s in enumerate(report.stages) if c in s.accuracy]
        ys = [s.accuracy[c] for s in report.stages if c in s.accuracy]
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("edgecl demo: EfficientNet-Lite0 (ImageNet) on Fashion-MNIST, per stage")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
