"""`edgecl predict`: classify images with the bundle's current state (onnxruntime only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes listed per image.")] = 3,
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml).")] = None,
    head: Annotated[str, typer.Option(help="Classifier: ncm (cosine to prototypes), lda (prototypes + the "
                                           "pooled covariance adapt accumulates), auto (lda when available).")]
    = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Class, score (cosine similarity, or the LDA score with the lda head) and top-k for each image."""
    from edgecl.device.infer import predict as run_predict

    results = run_predict(bundle, images, top_k=top_k, profile=device, head=head)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                typer.echo(f"{r['path']}: unreadable ({r['error']})")
                continue
            others = ", ".join(f"{t['class']} {t['score']:.3f}" for t in r["top_k"][1:])
            typer.echo(f"{r['path']}: {r['class']} {r['score']:.3f}" + (f"  ({others})" if others else ""))
    if any("error" in r for r in results):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
