"""The review queue: images `edgecl watch` was unsure of, waiting for an operator's label.

Layout (``BUNDLE/review/`` unless ``--review-dir``)::

    queue/<id><ext>        a copy of the image (the camera may delete its own)
    queue/<id>.json        what watch answered: class, probability, unknown, unknown_score, top_k, why queued
    labeled/<class>/<id><ext>   labeled images: an image folder `edgecl adapt --from-review` trains on
    trained/<time>/<class>/...  labeled images an adapt (``watch --adapt-when``) already trained on

An operator labels an item with an existing or a new class (it moves into ``labeled/<class>/``) or
discards it, through `edgecl review BUNDLE` (a local web page, ``review_page.PAGE``) or
`edgecl review BUNDLE --label ID CLASS` for scripts. The queue is bounded (images and bytes) and
stops taking images when the disk's free space falls under a floor: watch keeps serving either way.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.errors import DataError
from edgecl.formats.atomic import atomic_write_json
from edgecl.formats.images import IMAGE_SUFFIXES

REVIEW_DIR = "review"
QUEUE = "queue"
LABELED = "labeled"
TRAINED = "trained"
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,99}$")  # a folder name on every OS, no path tricks
_ID = re.compile(r"^[0-9a-f]{16}-[A-Za-z0-9_.+-]{1,80}$")


@dataclass
class QueueLimits:
    max_images: int = 1000          # queued images at most; more are dropped (counted), never served less
    max_mb: int = 500               # bytes of queued images at most
    min_free_mb: int = 200          # stop queueing when the disk holding the queue has less free space


def review_dir(bundle_dir: str | Path, override: str | Path | None = None) -> Path:
    return Path(override) if override else Path(bundle_dir) / REVIEW_DIR


def labeled_folder(bundle_dir: str | Path, data: str | Path | None, from_review: bool,
                   override: str | Path | None = None) -> Path:
    """`adapt`'s image folder: --data, or with --from-review the review's labeled folder."""
    if from_review and data is not None:
        raise DataError("--data and --from-review both name the images", "pass one of them")
    if not from_review:
        if data is None:
            raise DataError("no images to adapt on", "pass --data DIR, or --from-review for the labeled review images")
        return Path(data)
    folder = review_dir(bundle_dir, override) / LABELED
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise DataError(f"no labeled images in {folder}", "label queued images first: `edgecl review BUNDLE`")
    return folder


def check_class_name(name: str) -> str:
    name = name.strip()
    if not _CLASS_NAME.match(name) or name in (QUEUE, LABELED):
        raise DataError(f"{name!r} is not a usable class name",
                        "use letters, digits, space, _ . + - (up to 100), starting with a letter or digit")
    return name


class ReviewQueue:
    """The queue and the labeled folder under ``root``. Safe to use from watch and review at once:
    every change is a rename (a reader sees an item whole or not at all)."""

    def __init__(self, root: str | Path, limits: QueueLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or QueueLimits()
        self.queue_dir = self.root / QUEUE
        self.labeled_dir = self.root / LABELED
        self._count: int | None = None
        self._bytes = 0

    # -- watch's side ----------------------------------------------------------------------------
    def _usage(self) -> tuple[int, int]:
        if self._count is None:  # once per process, then kept up to date by add (review only removes)
            images = [p for p in self.queue_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES] \
                if self.queue_dir.is_dir() else []
            self._count, self._bytes = len(images), sum(p.stat().st_size for p in images if p.exists())
        return self._count, self._bytes

    def refresh(self) -> None:
        """Forget the cached usage (the operator may have emptied the queue)."""
        self._count = None

    def room_for(self, size: int) -> str | None:
        """None when an image of ``size`` bytes may be queued, else why not."""
        count, used = self._usage()
        if count >= self.limits.max_images or used + size > self.limits.max_mb * 1_000_000:
            self.refresh()  # the operator may have labeled or discarded some since: count again
            count, used = self._usage()
        if count >= self.limits.max_images:
            return "queue full (images)"
        if used + size > self.limits.max_mb * 1_000_000:
            return "queue full (bytes)"
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.queue_dir).free - size < self.limits.min_free_mb * 1_000_000:
            return "disk nearly full"
        return None

    def add(self, image: Path, answer: dict[str, Any], reason: str) -> str | None:
        """Queue a copy of ``image`` with watch's ``answer``; the id, or None when it could not be
        queued (full queue, low disk, the image gone): serving never depends on it."""
        try:
            size = image.stat().st_size
            if self.room_for(size) is not None:
                return None
            stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", image.stem)[:80] or "image"
            item = f"{time.time_ns():016x}-{stem}"
            target = self.queue_dir / f"{item}{image.suffix.lower()}"
            tmp = self.queue_dir / f".{item}.tmp"
            try:
                shutil.copyfile(image, tmp)
                atomic_write_json(self.queue_dir / f"{item}.json", {**answer, "id": item, "file": str(image),
                                                                   "reason": reason, "queued_utc": _utc()})
                os.replace(tmp, target)  # the image last: an item is listed once its image exists
            except BaseException:
                tmp.unlink(missing_ok=True)
                (self.queue_dir / f"{item}.json").unlink(missing_ok=True)
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EACCES, errno.EROFS):
                return None
            raise
        count, used = self._usage()
        self._count, self._bytes = count + 1, used + size
        return item

    # -- the operator's side ---------------------------------------------------------------------
    def items(self) -> list[dict[str, Any]]:
        """Queued items, oldest first: watch's answer plus ``id`` and ``image`` (the file name)."""
        if not self.queue_dir.is_dir():
            return []
        out = []
        for image in sorted(self.queue_dir.iterdir()):
            if image.name.startswith(".") or image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                meta = json.loads((self.queue_dir / f"{image.stem}.json").read_text())
            except (OSError, ValueError):
                meta = {}
            out.append({**meta, "id": image.stem, "image": image.name})
        return out

    def classes(self) -> list[str]:
        """Classes with labeled images so far."""
        if not self.labeled_dir.is_dir():
            return []
        return sorted(p.name for p in self.labeled_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def labeled_count(self) -> int:
        if not self.labeled_dir.is_dir():
            return 0
        return sum(1 for p in self.labeled_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def image_path(self, item: str) -> Path:
        """The queued image of ``item`` (an id, or its image's file name)."""
        stem = Path(item).stem if Path(item).suffix.lower() in IMAGE_SUFFIXES else item
        if not _ID.match(stem):
            raise DataError(f"{item!r} is not a review queue id", "pass an id that `edgecl review BUNDLE --list` shows")
        for suffix in sorted(IMAGE_SUFFIXES):
            path = self.queue_dir / f"{stem}{suffix}"
            if path.is_file():
                return path
        raise DataError(f"{item} is not in the review queue (labeled or discarded already?)",
                        "pass an id that `edgecl review BUNDLE --list` shows")

    def label(self, item: str, class_name: str) -> Path:
        """Move ``item`` into labeled/<class>/; returns the labeled image's path."""
        name = check_class_name(class_name)
        image = self.image_path(item)
        target_dir = self.labeled_dir / name
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / image.name
        os.replace(image, target)
        (self.queue_dir / f"{image.stem}.json").unlink(missing_ok=True)
        return target

    def discard(self, item: str) -> None:
        image = self.image_path(item)
        image.unlink()
        (self.queue_dir / f"{image.stem}.json").unlink(missing_ok=True)

    def label_file(self, image: str | Path, class_name: str) -> Path:
        """Label any image file (not only a queued one): a copy lands in labeled/<class>/."""
        source = Path(image)
        if source.suffix.lower() not in IMAGE_SUFFIXES or not source.is_file():
            raise DataError(f"{source} is not an image file", f"pass a file ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
        name = check_class_name(class_name)
        target_dir = self.labeled_dir / name
        target_dir.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", source.stem)[:80] or "image"
        target = target_dir / f"{time.time_ns():016x}-{stem}{source.suffix.lower()}"
        tmp = target_dir / f".{target.name}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target


    def take_labeled(self) -> Path | None:
        """Move labeled/ aside for one adapt (labels given meanwhile start a new labeled/)."""
        if self.labeled_count() == 0:
            return None
        target = self.root / f"training-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        os.replace(self.labeled_dir, target)
        return target

    def trained(self, taken: Path) -> Path:
        """The adapt committed: keep its images under trained/ (never trained on again)."""
        target = self.root / TRAINED / taken.name.removeprefix("training-")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(taken, target)
        return target

    def give_back(self, taken: Path) -> None:
        """The adapt failed: its images go back into labeled/ for the next try."""
        for image in sorted(taken.rglob("*")):
            if image.is_file():
                dest = self.labeled_dir / image.relative_to(taken)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(image, dest)
        shutil.rmtree(taken, ignore_errors=True)


def label(queue: ReviewQueue, item: str, class_name: str) -> Path:
    """An id / queued file name is moved; any other existing image file is copied."""
    path = Path(item)
    if path.is_file() and path.parent.resolve() != queue.queue_dir.resolve():
        return queue.label_file(path, class_name)
    return queue.label(path.name if path.parent.resolve() == queue.queue_dir.resolve() else item, class_name)


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the page's server (stdlib http.server, loopback by default) ----------------------------------

def known_classes(bundle_dir: str | Path) -> tuple[list[str], str]:
    """(the classes the current state knows, its generation)."""
    from .state import load_current, open_bundle
    state = load_current(open_bundle(bundle_dir))
    return list(state.prototypes.classes), state.generation or "bundle"


def create_server(queue: ReviewQueue, bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8765):  # noqa: ANN201
    """A ThreadingHTTPServer for the review page: GET /, /api/items, /image/<file>; POST /api/label
    {"id", "class"}, /api/discard {"id"}. POSTs must be JSON (a plain cross-site form cannot send it)."""
    from http import HTTPStatus
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgecl.errors import EdgeclError

    from .review_page import PAGE

    class Handler(BaseHTTPRequestHandler):
        server_version = "edgecl-review"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # quiet: the operator's terminal shows the URL only

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/api/items":
                    known, generation = known_classes(bundle_dir)
                    self._json(HTTPStatus.OK, {"items": queue.items(), "labeled": queue.labeled_count(),
                                               "classes": sorted(set(known) | set(queue.classes())),
                                               "state": generation})
                elif path.startswith("/image/"):
                    from urllib.parse import unquote
                    image = queue.image_path(unquote(path[len("/image/"):]))
                    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
                        image.suffix.lower(), "application/octet-stream")
                    self._send(HTTPStatus.OK, image.read_bytes(), kind)
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            except EdgeclError as exc:
                self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})

        def do_POST(self) -> None:  # noqa: N802
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON"})
                return
            try:
                length = min(int(self.headers.get("Content-Length", "0")), 1 << 16)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                    raise DataError("the body has no item id", 'send {"id": ..., "class": ...}')
                if self.path == "/api/label":
                    target = queue.label(body["id"], str(body.get("class", "")))
                    self._json(HTTPStatus.OK, {"labeled": str(target.relative_to(queue.root))})
                elif self.path == "/api/discard":
                    queue.discard(body["id"])
                    self._json(HTTPStatus.OK, {"discarded": body["id"]})
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            except (EdgeclError, ValueError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

    return ThreadingHTTPServer((host, port), Handler)
