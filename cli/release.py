"""`edgecl release` (host): the release round. Phase 1 merges (on the server), applies and sends the
candidate to the contributing devices for their statistics; `--finish` sums them, judges on held-out
images and publishes only if not worse (edgecl/release.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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
    strategy: Annotated[str, typer.Option(help="Merge: weighted-mean, trimmed-mean or median.")] = "weighted-mean",
    trim: Annotated[float | None, typer.Option(help="trimmed-mean: share dropped at each end.")] = None,
    exclude_device: Annotated[list[str] | None, typer.Option(help="Do not count this device (repeatable).")] = None,
    exclude_delta: Annotated[list[str] | None, typer.Option(help="Do not count this delta sha256 (repeatable).")]
    = None,
    tolerance: Annotated[float, typer.Option(help="Accuracy drop allowed per class group (0: none).")] = 0.0,
    finish: Annotated[bool, typer.Option("--finish", help="Phase 2: sum the statistics the devices sent under "
                                                         "the candidate (`edgecl restat`), judge, publish.")] = False,
    statistics_round: Annotated[bool, typer.Option(
        "--statistics-round/--no-statistics-round",
        help="Ask the contributing devices for their classes' statistics under the candidate (two phases); "
             "--no-statistics-round judges and publishes at once with the host's estimates.")] = True,
    wait_s: Annotated[float, typer.Option(help="--finish: wait up to this long for every contributing device's "
                                               "statistics (those that do not answer are not judged).")] = 0.0,
    work: Annotated[Path | None, typer.Option(help="Keep the built bundles here (default: a temp folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Publish the next version only if no class group is worse than in the current version or the frozen baseline.

    Exit 0 published, 2 refused (nothing published), 1 error."""
    from edgecl.formats.manifest import MANIFEST, load_manifest
    from edgecl.release import ReleaseOptions
    from edgecl.release import finish as run_finish
    from edgecl.release import release as run_release

    if (Path(bundle_id) / MANIFEST).is_file():
        bundle_id = load_manifest(bundle_id).bundle_id
    options = ReleaseOptions(
        heldout=heldout, current_dir=bundle, bundle_version=bundle_version, canary=list(canary or []),
        strategy=strategy, trim=trim, exclude_devices=list(exclude_device or []),
        exclude_deltas=list(exclude_delta or []), tolerance=tolerance, work_dir=work,
        statistics_round=statistics_round, wait_s=wait_s)
    report = (run_finish if finish else run_release)(bundle_id, server, token, options)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:5.1f}%"

        typer.echo(f"{bundle_id}: v{report.current_version} + merge of {report.merge['inputs']} deltas "
                   f"({report.merge['strategy']}) -> candidate v{report.version}")
        typer.echo(f"  {'group':<24} {'images':>6}  {'candidate':>9}  {'baseline':>9}  {'current':>9}  "
                   f"{'cand. on current classes':>24}")
        for name, row in report.groups.items():
            typer.echo(f"  {name:<24} {row['images']:>6}  {pct(row['candidate']):>9}  {pct(row['baseline']):>9}  "
                       f"{pct(row['current']):>9}  {pct(row['candidate_current_classes']):>24}"
                       + ("" if row["judged"] else "  (not judged: no statistics under the candidate)"))
    if not report.passed:
        typer.echo("release refused, nothing published: " + "; ".join(report.reasons), err=True)
        raise typer.Exit(code=EXIT_REFUSED)
    if not as_json and report.stage == "candidate":
        typer.echo(f"candidate v{report.version} sent to {', '.join(report.merge['devices'])} for their statistics "
                   f"(each runs `edgecl restat`); uploaded {report.uploaded_bytes:,} B. Then: edgecl release "
                   f"{bundle_id} --finish --heldout ...")
    elif not as_json:
        typer.echo(f"released {bundle_id} v{report.version} (signed by the server)"
                   + (f" to {', '.join(report.canary)} only" if report.canary else "")
                   + f"; uploaded {report.uploaded_bytes:,} B")


def register(app: typer.Typer) -> None:
    app.command("release")(release)
