"""`edgecl predict`: classify images with the bundle's current state (onnxruntime only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import HEAD_HELP, Head, JsonFlag, echo_json


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _unknown_text(r: dict) -> str:
    """'UNKNOWN (unknown score s)' when the calibrated threshold flags the image (the ranked classes
    before it are then only the nearest ones); nothing otherwise."""
    if r.get("unknown"):
        return f"UNKNOWN (unknown score {_number(r['unknown_score'], '.3g')})  "
    return ""


def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes listed per image.")] = 3,
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml); default: the "
                                                                  "profile the bundle was exported for.")] = None,
    head: Annotated[Head, typer.Option(help=HEAD_HELP)] = Head.auto,
    as_json: JsonFlag = False,
) -> None:
    """Class, probability and score (cosine similarity, or the LDA score) and top-k for each image.

    An image unlike every known class (its unknown score above the threshold calibrated on held-out
    images) is marked UNKNOWN; --json gives `unknown` and `unknown_score` per image."""
    from edgecl.device.infer import predict as run_predict

    results = run_predict(bundle, images, top_k=top_k, profile=device, head=head.value)
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
