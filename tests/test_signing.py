"""Release signatures (edgecl.formats.signing): Ed25519 over the manifest's canonical bytes."""

from __future__ import annotations

import json
import stat

import pytest

from edgecl.formats.signing import (
    RELEASE_CONTEXT,
    SignatureError,
    generate_private_key,
    manifest_object,
    parse_public_key,
    public_key,
    sign_manifest,
    verify_manifest,
    write_secret,
)

MANIFEST = {"bundle_id": "line-a", "version": 2, "files": {"weights.safetensors": "ab" * 32}, "mean": [0.5, 0.5, 0.5]}


def test_round_trip_and_every_change_breaks_it():
    private = generate_private_key()
    public = public_key(private)
    assert len(private) == len(public) == 32
    signature = sign_manifest(private, MANIFEST)
    verify_manifest(public, MANIFEST, signature)
    # the bytes of manifest.json may be formatted any way: the canonical object is what is signed
    verify_manifest(public, manifest_object(json.dumps(MANIFEST, indent=2).encode()), signature)
    for changed in ({**MANIFEST, "version": 3}, {**MANIFEST, "files": {"weights.safetensors": "cd" * 32}},
                    {**MANIFEST, "extra": 1}):
        with pytest.raises(SignatureError, match="does not verify"):
            verify_manifest(public, changed, signature)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(public_key(generate_private_key()), MANIFEST, signature)
    for bad in ("", "00" * 64, signature[:-2], signature.upper()):
        with pytest.raises(SignatureError):
            verify_manifest(public, MANIFEST, bad)


def test_the_context_prefix_is_part_of_the_signed_message():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edgecl.formats.delta import canonical_json

    private = generate_private_key()
    raw = ed25519.Ed25519PrivateKey.from_private_bytes(private).sign(canonical_json(MANIFEST).encode())
    with pytest.raises(SignatureError):        # a signature over the bare manifest is not a release signature
        verify_manifest(public_key(private), MANIFEST, raw.hex())
    assert RELEASE_CONTEXT == b"edgecl-release-v1\n"


def test_keys_and_secrets(tmp_path):
    assert parse_public_key(" " + "AB" * 32 + "\n") == bytes.fromhex("ab" * 32)
    with pytest.raises(SignatureError, match="64 hex"):
        parse_public_key("abc")
    path = tmp_path / "d" / "secret"
    write_secret(path, b"x")
    write_secret(path, b"y")
    assert path.read_bytes() == b"y" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]
