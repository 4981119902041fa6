"""`edgecl watch`: serve the current state on the images a camera writes into a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import HEAD_HELP, Head


def watch(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    folder: Annotated[Path, typer.Argument(help="Folder the camera writes images into.")],
    once: Annotated[bool, typer.Option("--once", help="Process what the folder holds, then exit.")] = False,
    log: Annotated[Path | None, typer.Option("--log", help="Append one JSON line per image here (rotated); "
                                                           "default: stdout.")] = None,
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml); default: the "
                                                                  "profile the bundle was exported for.")] = None,
    head: Annotated[Head, typer.Option(help=HEAD_HELP)] = Head.auto,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per inference call.")] = 16,
    settle_s: Annotated[float, typer.Option(min=0, help="Seconds a file must stay unchanged before it is "
                                                        "read (hidden and .tmp/.part names are never read: "
                                                        "write under one, then rename).")] = 1.0,
    poll_s: Annotated[float, typer.Option(min=0.01, help="Seconds between scans when nothing is new.")] = 0.5,
    low_confidence: Annotated[float, typer.Option(help="Queue answers below this probability for review.")] = 0.5,
    review_dir: Annotated[Path | None, typer.Option(help="Review queue folder (default BUNDLE/review).")] = None,
    queue_max: Annotated[int, typer.Option(help="Images the review queue holds at most.")] = 1000,
    queue_max_mb: Annotated[int, typer.Option(help="Megabytes the review queue holds at most.")] = 500,
    min_free_mb: Annotated[int, typer.Option(help="Stop queueing (never serving) below this free disk "
                                                  "space.")] = 200,
    log_max_mb: Annotated[float, typer.Option(help="Rotate the log at this size.")] = 10.0,
    log_keep: Annotated[int, typer.Option(help="Rotated logs kept.")] = 5,
    pass_classes: Annotated[str, typer.Option(help="Comma-separated classes that pass (for a line's PLC): "
                                                   "each log line gets \"pass\": true/false; an unknown "
                                                   "image never passes.")] = "",
    adapt_when: Annotated[int, typer.Option("--adapt-when", help="Adapt on the review's labeled images once "
                                                                "there are this many (0 = never), then "
                                                                "delta + push with a device config.")] = 0,
) -> None:
    """Classify each new image in FOLDER with the bundle's current state (picked up again after adapt,
    rollback or pull), flag unknown ones, queue unsure ones for `edgecl review`."""
    from edgecl.device.review import QueueLimits
    from edgecl.device.watch import AdaptPolicy, Watcher, WatchOptions, latency_summary

    opts = WatchOptions(batch_size=batch_size, settle_s=settle_s, poll_s=poll_s, head=head.value,
                        low_confidence=low_confidence, review_root=str(review_dir) if review_dir else None,
                        review=QueueLimits(queue_max, queue_max_mb, min_free_mb), log_max_mb=log_max_mb,
                        log_keep=log_keep, pass_classes=tuple(c.strip() for c in pass_classes.split(",") if c.strip()))
    watcher = Watcher(bundle, folder, opts, profile=device, log=log)
    if adapt_when:
        watcher.policy = AdaptPolicy(watcher, adapt_when)
    if not once:
        _stop_on_signals()
        typer.echo(f"watching {folder} with {bundle} (state {watcher.follower.generation}); Ctrl-C or SIGTERM "
                   "stops", err=True)
    report = watcher.run(once=once)
    lat = latency_summary(report.latencies_ms)
    rate = f"{report.images / report.seconds:.1f} images/s" if report.seconds else "-"
    p50 = "-" if lat["p50_ms"] is None else f"{lat['p50_ms']:.1f}"
    typer.echo(f"served {report.images} images ({report.unreadable} unreadable), {rate}, p50 {p50} ms; queued "
               f"{report.queued} for review ({report.not_queued} not: queue full or disk low); "
               f"next: `edgecl review {bundle}`", err=True)


def _stop_on_signals() -> None:
    """Ctrl-C and a service manager's SIGTERM end the loop the same way (KeyboardInterrupt: the decode
    thread joined, the drift statistics saved, the summary printed). Python leaves SIGINT ignored when
    the process started with it ignored (a background job of a non-interactive shell), and SIGTERM
    would otherwise end it without any of that."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)
