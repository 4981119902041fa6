"""`edgecl review`: label the images `edgecl watch` queued (a local web page, or --label for scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def review(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    label: Annotated[tuple[str, str] | None, typer.Option("--label", metavar="ITEM CLASS",
                                                          help="Label a queued item (its id or file) or any "
                                                               "image file with CLASS, then exit.")] = None,
    discard: Annotated[str | None, typer.Option("--discard", metavar="ITEM", help="Discard a queued item.")] = None,
    list_items: Annotated[bool, typer.Option("--list", help="List the queue, then exit.")] = False,
    review_dir: Annotated[Path | None, typer.Option(help="Review queue folder (default BUNDLE/review).")] = None,
    host: Annotated[str, typer.Option(help="Address the page listens on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8765,
    as_json: JsonFlag = False,
) -> None:
    """Serve the review page (assign an existing or a new class, or discard); labels land in
    REVIEW/labeled/<class>/, which `edgecl adapt BUNDLE --from-review` trains on."""
    from edgecl.device.review import ReviewQueue, create_server
    from edgecl.device.review import label as label_item
    from edgecl.device.review import review_dir as resolve_dir
    from edgecl.errors import DataError

    if not (bundle / "manifest.json").is_file():
        raise DataError(f"{bundle} is not a bundle folder", "pass the bundle folder `edgecl watch` serves")
    queue = ReviewQueue(resolve_dir(bundle, review_dir))
    if label is not None:
        target = label_item(queue, label[0], label[1])
        typer.echo(f"labeled {label[0]} as {label[1]} -> {target}; {queue.labeled_count()} labeled images wait for "
                   f"`edgecl adapt {bundle} --from-review`")
        return
    if discard is not None:
        queue.discard(discard)
        typer.echo(f"discarded {discard}")
        return
    if list_items:
        items = queue.items()
        if as_json:
            echo_json(items)
            return
        for item in items:
            verdict = "unknown" if item.get("unknown") else f"{item.get('class')} p={item.get('probability')}"
            typer.echo(f"{item['id']}  {verdict}  ({item.get('reason', '')}, {item.get('file', '')})")
        typer.echo(f"{len(items)} queued, {queue.labeled_count()} labeled")
        return
    server = create_server(queue, bundle, host, port)
    typer.echo(f"review page: http://{host}:{server.server_address[1]}/  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    app.command("review")(review)
