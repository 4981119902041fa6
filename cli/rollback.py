"""`edgecl rollback`: return a bundle's device state to what it was before the last adapt (or upgrade)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .device import BundleArg, ConfigOpt, bundle_words, resolve_bundle
from .options import JsonFlag, echo_json


def _state_summary(bundle: Path) -> dict[str, Any] | None:
    """What predict/eval run on now: generation, classes, default head, what made it (None if unreadable)."""
    from edgecl.device.infer import resolve_head
    from edgecl.device.state import load_current, open_bundle
    from edgecl.errors import EdgeclError

    try:
        opened = open_bundle(bundle, verify=False)
        state = load_current(opened)
    except EdgeclError:
        return None
    return {"generation": state.generation, "classes": list(state.prototypes.classes),
            "head": resolve_head(state, "auto", opened), "meta": state.meta}


def _what_made(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    if "upgraded_from" in meta:
        carried = meta.get("carried_prototypes") or []
        return (f"the state carried over from {meta['upgraded_from']} by `edgecl pull` / `upgrade` (stored images of "
                f"{len(meta.get('exemplar_classes') or [])} classes"
                + (f", the device's own classes {', '.join(carried)}" if carried else "")
                + (", LDA statistics" if summary["head"] == "lda" else "") + ")")
    report = meta.get("report") or {}
    added = report.get("classes_added") or []
    return (f"the adaptation on {meta.get('data_dir', 'images')}"
            + (f" (added {', '.join(added)})" if added else "")
            + (f", {report['kept_epochs']} epochs of training kept" if report.get("kept_epochs") else ""))


def rollback_lines(bundle: Path, undone: dict[str, Any] | None, now: dict[str, Any] | None,
                   result: dict[str, Any]) -> list[str]:
    """Say what a rollback undid and what changes for predict/eval."""
    what = _what_made(undone) if undone else "the last state"
    lines = [f"rolled back {bundle}: undid {result['undone']}, {what}"]
    if now is not None:
        where = "bundle (the bundle's own, no device state)" if now["generation"] is None else now["generation"]
        lines.append(f"  current state: {where}, {len(now['classes'])} classes")
        if undone is not None:
            lost = [c for c in undone["classes"] if c not in now["classes"]]
            if lost:
                lines.append(f"  classes no longer known: {', '.join(lost)}")
            if undone["head"] != now["head"]:
                lines.append(f"  predict and eval's default head changes from {undone['head']} to {now['head']}")
    lines.append("  this cannot be undone, and a second rollback is refused (one level)")
    return lines


def rollback(bundle: BundleArg = None, as_json: JsonFlag = False, config: ConfigOpt = None) -> None:
    """Undo the last `edgecl adapt` or `upgrade`/`pull` carry-over (once); says what it undid."""
    from edgecl.device.state import rollback as run_rollback

    bundle, cfg = resolve_bundle(bundle, config)
    undone = _state_summary(bundle)
    result = run_rollback(bundle)
    if as_json:
        echo_json(result)
        return
    for line in rollback_lines(bundle, undone, _state_summary(bundle), result):
        typer.echo(line)
    typer.echo(f"next: edgecl eval{bundle_words(bundle, cfg)} --data DIR   (score the state you are back on)")


def register(app: typer.Typer) -> None:
    app.command("rollback")(rollback)
