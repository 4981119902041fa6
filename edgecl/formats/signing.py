"""Release signatures: Ed25519 over a bundle manifest's canonical bytes (docs/server.md, "Downlink").

The server signs each bundle version it releases with its own key (made when the store is
created); a device pins the server's public key at ``edgecl device init --server-key`` and refuses
a pulled version whose signature does not verify. The manifest lists the sha256 of every other
file of the bundle (``manifest.files``), so one signature over the manifest covers every byte a
device downloads.

Signed message: ``b"edgecl-release-v1\\n"`` + the manifest's canonical JSON (sorted keys, no spaces,
ASCII; the same rule as delta headers). The prefix keeps a release signature from ever verifying
as a signature over anything else.

Ed25519 comes from the ``cryptography`` package, imported here only (device and server extras).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError
from edgecl.formats.atomic import fsync_dir
from edgecl.formats.delta import canonical_json

RELEASE_CONTEXT = b"edgecl-release-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


class SignatureError(EdgeclError):
    """A release signature is missing, malformed or does not verify with the pinned key (or the
    cryptography package that checks it is not installed)."""


def _crypto() -> tuple[Any, Any, Any]:
    """(ed25519, serialization, InvalidSignature) from the cryptography package."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - the extras install it
        raise SignatureError("release signatures need the cryptography package",
                             "pip install 'edgecl[device]' (or 'edgecl[server]')") from exc
    return ed25519, serialization, InvalidSignature


def generate_private_key() -> bytes:
    """32 random bytes: an Ed25519 private key (its seed)."""
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_key(text: str) -> bytes:
    """The server's public key as printed by ``edgecl server key`` (64 hex digits) -> 32 bytes."""
    text = text.strip().lower()
    if not _HEX64.fullmatch(text):
        raise SignatureError("the server key is not 64 hex digits",
                             "copy the key printed by `edgecl server key` on the server")
    return bytes.fromhex(text)


def release_message(manifest: dict[str, Any]) -> bytes:
    return RELEASE_CONTEXT + canonical_json(manifest).encode("ascii")


def sign_manifest(private: bytes, manifest: dict[str, Any]) -> str:
    """Hex Ed25519 signature (128 hex digits) of the manifest object."""
    key = _crypto()[0].Ed25519PrivateKey.from_private_bytes(private)
    return key.sign(release_message(manifest)).hex()


def verify_manifest(public: bytes, manifest: dict[str, Any], signature_hex: str) -> None:
    """Raise SignatureError unless ``signature_hex`` is the server's signature of ``manifest``."""
    ed25519, _, InvalidSignature = _crypto()  # noqa: N806 - an exception class
    if not isinstance(signature_hex, str) or not _HEX128.fullmatch(signature_hex):
        raise SignatureError("the release has no valid signature (128 hex digits)",
                             "pull from a server that signs its releases (edgecl >= 0.2)")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(signature_hex),
                                                                  release_message(manifest))
    except InvalidSignature:
        raise SignatureError(f"the release signature of {manifest.get('bundle_id')} v{manifest.get('version')} "
                             "does not verify with the pinned server key",
                             "refusing it: check `edgecl server key` on the real server and the device's "
                             "server_key (edgecl device init --server-key)") from None


def manifest_object(manifest_bytes: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(manifest_bytes)
    except ValueError as exc:
        raise SignatureError(f"the manifest is not JSON ({exc})", "pull again") from exc
    if not isinstance(obj, dict):
        raise SignatureError("the manifest is not a JSON object", "pull again")
    return obj


def write_secret(path: str | Path, data: bytes) -> None:
    """Atomic write of a secret (a private key, a device's token): mode 0600 from the moment the
    temp file exists (mkstemp), fsync, rename, folder fsync. ``atomic.atomic_write_bytes`` makes
    files 0644 on purpose (bundles are shared), so secrets have this one writer."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = ""
        fsync_dir(target.parent)
    except OSError as exc:
        raise EdgeclError(f"cannot write {target} ({exc.strerror})", "choose a writable location") from exc
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
