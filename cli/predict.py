"""`edgecl predict`: classify images with the bundle's current state (onnxruntime only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .device import ConfigOpt, DeviceOpt, device_config, resolve_bundle, resolve_profile
from .options import HEAD_HELP, Head, JsonFlag, echo_json


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder becomes the image files under it (by suffix, sorted, sub-folders too)."""
    from edgecl.errors import DataError
    from edgecl.formats.images import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no image files", f"add images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise DataError("no images given", "pass image files or folders after the bundle")
    return files


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _unknown_text(r: dict) -> str:
    """'UNKNOWN (unknown score s)' when the calibrated threshold flags the image (the ranked classes
    before it are then only the nearest ones); nothing otherwise."""
    if r.get("unknown"):
        return f"UNKNOWN (unknown score {_number(r['unknown_score'], '.3g')})  "
    return ""


def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="[BUNDLE] IMAGE_OR_FOLDER...",
                                                help="A bundle folder first (default: the device config's "
                                                     "bundle), then image files or folders of images.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes listed per image.")] = 3,
    device: DeviceOpt = None,
    head: Annotated[Head, typer.Option(help=HEAD_HELP)] = Head.auto,
    as_json: JsonFlag = False,
    config: ConfigOpt = None,
) -> None:
    """Class, probability and score (cosine similarity, or the LDA score) and top-k for each image.

    An image unlike every known class (its unknown score above the threshold calibrated on held-out
    images) is marked UNKNOWN; --json gives `unknown` and `unknown_score` per image."""
    from edgecl.device.infer import predict as run_predict
    from edgecl.formats.manifest import MANIFEST

    given: Path | None = paths[0] if (paths[0] / MANIFEST).is_file() else None
    cfg = device_config(config)
    if given is None and (cfg is None or not cfg.bundle) and len(paths) > 1:
        given = paths[0]   # meant as the bundle (no configured one): the library says what is wrong with it
    bundle, cfg = resolve_bundle(given, config)
    images = image_files(paths[1:] if given is not None else paths)
    results = run_predict(bundle, images, top_k=top_k, profile=resolve_profile(device, cfg), head=head.value)
    if as_json:
        echo_json(results)
    else:
        for r in results:
            if "error" in r:
                typer.echo(f"{r['path']}: unreadable ({r['error']})")
                continue
            ranked = "  ".join(f"{t['class']} p={_number(t['probability'], '.3f')} score={_number(t['score'], '.3f')}"
                               for t in r["top_k"])
            flag = _unknown_text(r)
            typer.echo(f"{r['path']}: {ranked}  {flag}[head {r['head']}, state {r['state']}]")
    if any("error" in r for r in results):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
