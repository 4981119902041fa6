"""`edgecl release` (host): the release round. Phase 1 merges (on the server), applies and sends the
candidate to the contributing devices for their statistics; `--finish` sums them, judges on held-out
images and publishes only if not worse (edgecl/release.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_REFUSED = 2


def release(
    bundle_id: Annotated[str, typer.Argument(help="Bundle lineage id (manifest.bundle_id), or a bundle folder of "
                                                  "that lineage (its id is read from its manifest).")],
    heldout: Annotated[Path, typer.Option(help="Held-out images, one folder per class (never trained on).")],
    server: Annotated[str, typer.Option(envvar="EDGECL_SERVER", help="Fleet server URL.")] = "",
    token: Annotated[str, typer.Option(envvar="EDGECL_ADMIN_TOKEN", help="An admin token.")] = "",
    bundle: Annotated[Path | None, typer.Option(help="Local copy of the current version (default: downloaded "
                                                     "from the server).")] = None,
    bundle_version: Annotated[int | None, typer.Option(help="Version whose deltas to merge (default: the "
                                                            "newest released).")] = None,
    canary: Annotated[list[str] | None, typer.Option(help="Release to this device only (repeat for several); "
                                                          "`edgecl server release promote` widens it.")] = None,
    strategy: Annotated[str, typer.Option(help="Merge: ties (sign election), weighted-mean, trimmed-mean or "
                                                 "median.")] = "ties",
    scale: Annotated[float, typer.Option(help="The server's step: candidate = current + scale x the merged delta "
                                              "(0 < scale <= 2).")] = 1.0,
    trim: Annotated[float | None, typer.Option(help="trimmed-mean: share dropped at each end.")] = None,
    exclude_device: Annotated[list[str] | None, typer.Option(help="Do not count this device (repeatable).")] = None,
    exclude_delta: Annotated[list[str] | None, typer.Option(help="Do not count this delta sha256 (repeatable).")]
    = None,
    tolerance: Annotated[float, typer.Option(help="Accuracy drop allowed per class group (0: none).")] = 0.0,
    class_data: Annotated[Path | None, typer.Option(help="Images of the current version's classes (the folder it was "
                                                         "exported from): their statistics are recomputed under "
                                                         "the candidate instead of moved by drift; with --finish "
                                                         "their scatter lets the gate judge with the LDA head.")] = None,
    head: Annotated[str, typer.Option(help="--finish: the head the gate scores with: auto (LDA, the head devices "
                                           "serve, when every class's scatter is known under both backbones; "
                                           "else ncm) or ncm.")] = "auto",
    finish: Annotated[bool, typer.Option("--finish", help="Phase 2: sum the statistics the devices sent under "
                                                         "the candidate (`edgecl restat`), judge, publish.")] = False,
    statistics_round: Annotated[bool, typer.Option(
        "--statistics-round/--no-statistics-round",
        help="Ask the contributing devices for their classes' statistics under the candidate (two phases); "
             "--no-statistics-round judges and publishes at once with the host's estimates.")] = True,
    ask_shared: Annotated[bool, typer.Option(
        "--ask-shared", help="Ask the devices that shared their exemplars for their statistics too (`edgecl "
                             "restat`: every image they hold, not 20 a class): a two-phase round even when every "
                             "device shared them, consolidated as in one phase (docs/server.md#exemplars-shared).")]
    = False,
    update_known: Annotated[bool, typer.Option(
        "--update-known/--no-update-known",
        help="--finish: the devices' images of the current version's classes join those classes' statistics "
             "(off: another camera's view of a class moves its mean away from the images it was made from; a "
             "class a device added in an earlier round is re-placed by that device either way; "
             "docs/server.md#release-round).")] = False,
    publish: Annotated[bool, typer.Option("--publish/--no-publish",
                                          help="--no-publish judges and reports only (e.g. on test images): with "
                                               "--finish the candidate stays open for a real --finish; without, "
                                               "a round that needs no statistics round (every device shared its "
                                               "exemplars, or --no-statistics-round) publishes nothing.")] = True,
    consolidate: Annotated[int | None, typer.Option(
        help="Epochs of the devices' own training rule on the fleet's exemplars of every class, from the merged "
             "delta, before the candidate is judged (needs exemplars of every class: mode 2, every contributing "
             "device shares them; docs/server.md#consolidate). 0: none. Default: 10 in a round where the host "
             "holds exemplars of every class, else none.", min=0, max=50, show_default=False)] = None,
    wait_s: Annotated[float, typer.Option(help="--finish: wait up to this long for every contributing device's "
                                               "statistics (those that do not answer are not judged).")] = 0.0,
    work: Annotated[Path | None, typer.Option(help="Keep the built bundles here (default: a temp folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
) -> None:
    """Publish the next version only if no class group is worse than in the current version or the frozen baseline.

    Exit 0 published, 2 refused (nothing published), 1 error."""
    from edgecl import release as release_module
    from edgecl.formats.manifest import MANIFEST, load_manifest
    from edgecl.progress import phases

    name = ""
    if (Path(bundle_id) / MANIFEST).is_file():
        manifest = load_manifest(bundle_id)
        bundle_id, name = manifest.bundle_id, manifest.model_name
    options = release_module.ReleaseOptions(
        heldout=heldout, current_dir=bundle, bundle_version=bundle_version, canary=list(canary or []),
        strategy=strategy, scale=scale, trim=trim, exclude_devices=list(exclude_device or []),
        exclude_deltas=list(exclude_delta or []), tolerance=tolerance, work_dir=work, class_data=class_data,
        statistics_round=statistics_round, wait_s=wait_s, head=head, publish=publish,
        update_known=update_known, consolidate_epochs=consolidate, ask_shared=ask_shared)
    # edgecl.release announces its phases with edgecl.progress.phase(); shown on a terminal only.
    run = release_module.finish if finish else release_module.release
    with phases(0, "release", enabled=not (quiet or as_json)):
        report = run(bundle_id, server, token, options)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in release_lines(report, name, heldout, tolerance):
            typer.echo(line)
        if report.consolidation:
            c = report.consolidation
            typer.echo(f"consolidated: {c['epochs']} epochs, {c['steps']} steps on {c['images']} exemplar images "
                       f"of {len(c['classes'])} classes (loss {c['first_loss']:.3f} -> {c['last_loss']:.3f}, "
                       f"{c['seconds']:.0f} s)")
        small = small_groups(report.groups)
        if small:
            fewest = min(_few_images(report.groups).values())
            typer.echo(f"note: a group is judged on few held-out images here: {small} (one image = "
                       f"{100 / fewest:.1f} points), too few to tell a drop of a point or two from noise; give "
                       "--heldout a few hundred images per group (docs/limits.md)", err=True)
    if report.estimated and not as_json:
        typer.echo(("the current classes " if report.stage == "candidate" else "no device answered for the classes ")
                   + ", ".join(report.estimated)[:300]
                   + (" (added by devices in earlier rounds; the host holds no image of them) are placed under the "
                      "candidate by the devices that hold their images, in phase 2; until then the host's drift "
                      "estimate, not judged" if report.stage == "candidate" else
                      ": they keep the host's drift estimate under the candidate"))
    if not report.passed:
        typer.echo("release refused, nothing published: " + "; ".join(report.reasons), err=True)
        if not as_json:
            typer.echo("next: the devices keep their version; see docs/server.md#release-round for what "
                       "to try (--exclude-device, --strategy median, more held-out images)")
        raise typer.Exit(code=EXIT_REFUSED)
    if not as_json and report.stage == "candidate":
        typer.echo(f"candidate v{report.version} sent to {', '.join(report.asked or report.merge['devices'])} for their "
                   "statistics; "
                   f"uploaded {report.uploaded_bytes / 1e6:.2f} MB")
        typer.echo(f"next: on each of those devices, `edgecl restat`; then `edgecl release {bundle_id} --finish "
                   f"--heldout {heldout}`")
    elif not as_json and not report.published:
        typer.echo(f"judged only (--no-publish): v{report.version} passes; nothing published"
                   + (f", the candidate stays open for `edgecl release {bundle_id} --finish`" if finish else
                      "; the same command without --no-publish releases it"))
    elif not as_json:
        typer.echo(f"released {bundle_id} v{report.version} (signed by the server)"
                   + (f" to {', '.join(report.canary)} only" if report.canary else " to every device")
                   + f"; uploaded {report.uploaded_bytes / 1e6:.1f} MB")
        typer.echo("next: on each device, `edgecl pull`"
                   + ("; then `edgecl server release promote` to widen the canary" if report.canary else ""))


SMALL_GROUP = 100      # held-out images below which a group's verdict turns on a few images (B7, seed 7)


def _few_images(groups: dict[str, Any]) -> dict[str, int]:
    """The judged groups with fewer than SMALL_GROUP held-out images: group -> images."""
    return {g: int(row["images"]) for g, row in groups.items()
            if row.get("judged", True) and 0 < int(row["images"]) < SMALL_GROUP}


def small_groups(groups: dict[str, Any]) -> str:
    """'dev-a (40), dev-b (40)': the judged groups with fewer than SMALL_GROUP held-out images."""
    return ", ".join(f"{g.removeprefix('device:')} ({n})" for g, n in _few_images(groups).items())


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _scale(merge: dict[str, Any]) -> str:
    scale = float(merge.get("scale", 1.0))
    return "" if scale == 1.0 else f" x {scale:g}"


def _head(report: Any) -> str:
    head = getattr(report, "head", None) or {"name": "ncm", "why": ""}
    return f"{head['name']} head" + (f" ({head['why']})" if head.get("why") else "")


def release_lines(report: Any, name: str, heldout: Path, tolerance: float) -> list[str]:
    """The release table: every accuracy names its head and its images; the columns and the rule said."""
    merge = report.merge
    title = f"{name} ({report.bundle_id[:8]})" if name else report.bundle_id
    devices = ", ".join(merge.get("devices") or []) or "-"
    cur, new = report.current_version, report.version
    lines = [f"{title}: v{cur} + {plural(merge['inputs'], 'delta')} ({merge['strategy']} merge{_scale(merge)}; devices: "
             f"{devices}) -> candidate v{new}",
             f"accuracy on the held-out images in {heldout} (never trained on), {_head(report)}, per class group:",
             f"  {'group':<26} {'images':>6}  {'candidate':>9}  {'baseline':>9}  {'current':>9}"]
    for group, row in report.groups.items():
        label = f"v{cur}'s own classes" if group == "calibration" else group.replace("device:", "new classes of ")
        lines.append(f"  {label:<26} {row['images']:>6}  {_pct(row['candidate']):>9}  {_pct(row['baseline']):>9}  "
                     f"{_pct(row['current']):>9}"
                     + ("" if row.get("judged", True) else "  (not judged: no statistics under the candidate)"))
    everything = "all held-out images"
    # The current version scores only the images of classes it knows: a total over fewer images is not comparable.
    cur_all = report.current["accuracy"] if report.current["images"] == report.candidate["images"] else None
    lines.append(f"  {everything:<26} {report.candidate['images']:>6}  {_pct(report.candidate['accuracy']):>9}  "
                 f"{_pct(report.baseline['accuracy']):>9}  {_pct(cur_all):>9}")
    lines.append(f"  candidate = v{new}, the merged deltas applied to v{cur}; baseline = v{cur}'s backbone unchanged "
                 "with every device's classes added (what the fleet has without adapting); current = v"
                 f"{cur} as released (its own classes only)")
    calibration = report.groups.get("calibration") or {}
    if calibration.get("candidate_current_classes") is not None:
        lines.append(f"  v{cur}'s own classes with only v{cur}'s classes to choose from: candidate "
                     f"{_pct(calibration['candidate_current_classes'])} vs current {_pct(calibration['current'])}")
    points = 100 * tolerance
    allowed = f" by more than {points:g} point{'' if points == 1 else 's'}" if tolerance else ""
    lines.append(f"  rule: publish v{new} only if no group's candidate is below its baseline{allowed}, and, "
                 f"choosing among v{cur}'s classes only, not below current on them")
    return lines


def register(app: typer.Typer) -> None:
    app.command("release")(release)
