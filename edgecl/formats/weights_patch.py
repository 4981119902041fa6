"""A weights file as a small patch against an earlier one (``edgecl release`` makes it, ``edgecl pull`` applies it).

A version made by the release moves a few percent of the weights (the masked elements the fleet
changed); every other byte of ``weights.safetensors`` is the same as in the version the devices
run. The patch names the 4-byte words that differ and how each changed:

    bytes 0-7    b"ECLPATCH"
    bytes 8-15   header length H, unsigned 64-bit little-endian
    H bytes      header JSON (sorted keys, compact, ASCII): format = "edgecl-weights-patch",
                 format_version = 1, from_sha256, to_sha256, size (the bytes of both files, a
                 multiple of 4), words (N, how many words differ), mode ("add" or "xor")
    the rest     zlib (RFC 1950) of: the gaps between the changed word positions (uint32: the
                 first position + 1, then each difference), then the changes (4 bytes each):
                 mode "add": float32 steps, new = float32(old + step), chosen when that gives
                 every changed word bit for bit; mode "xor": new = old XOR change. Both arrays
                 as 4 byte planes (byte 0 of every value, then byte 1, ...).

Byte planes because the steps of one delta share few exponents and the XOR of a moved float32
keeps its sign and exponent bits zero, and the gaps' high bytes are mostly zero: zlib codes
those planes in a few bytes. numpy
and the stdlib only: the device applies it. ``apply_patch`` refuses a patch for another file, one
that decodes past its declared size, and a result whose sha256 is not ``to_sha256``; the caller
also checks the result against the signed manifest and falls back to the whole file.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

from edgecl.errors import EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.hashing import sha256_file

MAGIC = b"ECLPATCH"
FORMAT = "edgecl-weights-patch"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 4096
# A patch larger than this share of the file it makes is not worth a second download.
MAX_PATCH_SHARE = 0.5


class PatchError(EdgeclError):
    """A patch that is malformed, for another file, or does not produce the file it names."""


def patch_name(from_sha256: str) -> str:
    """The patch's file name in a release (a plain name the server stores beside the bundle's files)."""
    return f"weights.from-{from_sha256[:16]}.patch"


def make_patch(old: bytes, new: bytes) -> bytes | None:
    """The patch that turns ``old`` into ``new``; None when the files differ in size (another
    model layout: no word-for-word patch) or their size is not a multiple of 4."""
    if len(old) != len(new) or len(old) % 4:
        return None
    a, b = np.frombuffer(old, "<u4"), np.frombuffer(new, "<u4")
    positions = np.flatnonzero(a != b)
    gaps = np.diff(positions, prepend=-1).astype("<u4")
    mode, changes = "xor", a[positions] ^ b[positions]
    with np.errstate(all="ignore"):
        before, after = a[positions].view("<f4"), b[positions].view("<f4")
        steps = (after - before).astype("<f4")
        if np.isfinite(steps).all() and np.array_equal((before + steps).astype("<f4").view("<u4"), b[positions]):
            # Every changed word is a float32 that old + step reproduces bit for bit (a weight file
            # moved by a delta): the steps repeat where the fleet's values did, XOR noise does not
            # (EfficientNet-Lite0's gate-made v2: 216 kB against 270 kB).
            mode, changes = "add", steps.view("<u4")
    body = b"".join(_planes(v) for v in (gaps, changes))
    header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "from_sha256": _sha(old),
                         "to_sha256": _sha(new), "size": len(old), "words": int(len(positions)), "mode": mode},
                        sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header + zlib.compress(body, 9)


def read_header(patch: bytes) -> dict:
    """The patch's header, checked (PatchError otherwise)."""
    if len(patch) < 16 or patch[:8] != MAGIC:
        raise PatchError("the weights patch does not start with ECLPATCH", "refused: the whole file is downloaded")
    length = int.from_bytes(patch[8:16], "little")
    if length > MAX_HEADER_BYTES or 16 + length > len(patch):
        raise PatchError(f"the weights patch declares a {length}-byte header", "refused: the whole file is downloaded")
    try:
        header = json.loads(patch[16:16 + length])
    except ValueError:
        header = None
    ok = (isinstance(header, dict) and header.get("format") == FORMAT
          and header.get("format_version") == FORMAT_VERSION
          and all(isinstance(header.get(k), str) and len(header[k]) == 64 for k in ("from_sha256", "to_sha256"))
          and all(isinstance(header.get(k), int) and not isinstance(header[k], bool) and header[k] >= 0
                  for k in ("size", "words"))
          and header["size"] % 4 == 0 and header["words"] <= header["size"] // 4
          and header.get("mode") in ("xor", "add"))
    if not ok:
        raise PatchError("the weights patch's header is malformed", "refused: the whole file is downloaded")
    return header


def apply_patch(old: bytes, patch: bytes) -> bytes:
    """``old`` with the patch applied; PatchError unless ``old`` is the file the patch was made
    from and the result hashes to the patch's ``to_sha256``."""
    header = read_header(patch)
    if len(old) != header["size"] or _sha(old) != header["from_sha256"]:
        raise PatchError("the weights patch was made for another weights file", "refused: the whole file is downloaded")
    n = header["words"]
    expected = 8 * n   # two uint32 arrays of n values
    z = zlib.decompressobj()
    try:
        body = z.decompress(patch[16 + int.from_bytes(patch[8:16], "little"):], expected + 1)
    except zlib.error as exc:
        raise PatchError(f"the weights patch does not decompress ({exc})", "refused: the whole file is downloaded") from exc
    if len(body) != expected or not z.eof or z.unconsumed_tail or z.unused_data:
        raise PatchError("the weights patch's body is not the size its header says", "refused: the whole file is downloaded")
    gaps, changes = _unplanes(body[:4 * n], n), _unplanes(body[4 * n:], n)
    if n and (gaps.min() < 1):
        raise PatchError("the weights patch's positions do not increase", "refused: the whole file is downloaded")
    positions = np.cumsum(gaps.astype(np.int64)) - 1
    if n and positions[-1] >= header["size"] // 4:
        raise PatchError("the weights patch writes past the end of the file", "refused: the whole file is downloaded")
    words = np.frombuffer(old, "<u4").copy()
    if header["mode"] == "xor":
        words[positions] ^= changes
    else:
        with np.errstate(all="ignore"):   # IEEE float32 addition: the same bits on every machine
            words[positions] = (words[positions].view("<f4") + changes.view("<f4")).astype("<f4").view("<u4")
    new = words.tobytes()
    if _sha(new) != header["to_sha256"]:
        raise PatchError("the patched weights do not hash to the patch's to_sha256", "refused: the whole file is downloaded")
    return new


def attach_weights_patch(bundle_dir: str | Path, old_weights: str | Path) -> str | None:
    """Release time: write the patch from ``old_weights`` (what the devices run now) to the
    bundle's ``weights.safetensors`` into the bundle, list it in the manifest's ``server_files``,
    ``sizes`` and ``weights_patches``, and rewrite the manifest (before it is signed). Returns the
    patch's name; None (nothing written) when the weights did not change, no word-for-word patch
    exists, or the patch would not be much smaller than the file."""
    bundle_dir = Path(bundle_dir)
    old, new = Path(old_weights).read_bytes(), (bundle_dir / mf.WEIGHTS).read_bytes()
    manifest = mf.load_manifest(bundle_dir)
    if manifest.files.get(mf.WEIGHTS) != _sha(new):
        raise PatchError(f"{bundle_dir / mf.WEIGHTS} does not match its manifest", "build the bundle again")
    patch = make_patch(old, new) if old != new else None
    if patch is None or len(patch) > MAX_PATCH_SHARE * len(new):
        return None
    name = patch_name(_sha(old))
    atomic_write_bytes(bundle_dir / name, patch)
    manifest.server_files[name] = sha256_file(bundle_dir / name)
    manifest.sizes[name] = len(patch)
    manifest.weights_patches[_sha(old)] = name
    manifest.save(bundle_dir)
    return name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _planes(values: np.ndarray) -> bytes:
    return values.astype("<u4").view(np.uint8).reshape(-1, 4).T.tobytes()


def _unplanes(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(4, n).T.copy().view("<u4").reshape(-1)
