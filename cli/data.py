"""`edgecl data`: make labelled image folders to try edgecl with (real images, installed offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Make image folders from data sets installed offline.",
                       no_args_is_help=True)


@data_app.command("fashion-mnist")
def fashion_mnist(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write: OUT/<class>/<n>.png.")],
    classes: Annotated[str, typer.Option(help="Comma-separated classes: tshirt, trouser, pullover, dress, coat, "
                                              "sandal, shirt, sneaker, bag, ankle-boot.")],
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 50,
    split: Annotated[str, typer.Option(help="train (from the training file) or heldout (from the test file: "
                                            "never among any train folder's images).")] = "train",
    seed: Annotated[int | None, typer.Option(help="Seed of the draw (default: the benchmarks').")] = None,
    source: Annotated[Path | None, typer.Option(help="Folder of the *-ubyte.gz files (default: Debian's "
                                                     "dataset-fashion-mnist, /usr/share/datasets/fashion-mnist).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Write Fashion-MNIST images (28x28 grayscale PNGs) as an image folder, one sub-folder per class."""
    from edgecl import datasets

    ids = datasets.fashion_class_ids([c for c in classes.split(",") if c.strip()])
    counts = datasets.write_fashion_folder(out, ids, per_class, split=split,
                                           seed=datasets.SEED if seed is None else seed,
                                           source=source or datasets.FASHION_MNIST_DIR, overwrite=overwrite)
    typer.echo(f"wrote {out}: {sum(counts.values())} {split} images, {per_class} per class of "
               f"{', '.join(counts)}")
    if split == "heldout":
        typer.echo(f"next: score a bundle on them: edgecl eval [BUNDLE] --data {out}")
    else:
        typer.echo(f"next: edgecl export RECIPE --data {out} -o bundle (a model's first classes), or "
                   f"edgecl adapt [BUNDLE] --data {out} (new classes on a device)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
