"""A weights file as a small patch against an earlier one (``edgecl release`` makes it, ``edgecl pull`` applies it).

A version made by the release moves a few percent of the weights (the masked elements the fleet
changed); every other byte of ``weights.safetensors`` is the same as in the version the devices
run. Two formats (docs/bundle-format.md#weights-patch):

    bytes 0-7    b"ECLPATCH"
    bytes 8-15   header length H, unsigned 64-bit little-endian
    H bytes      header JSON (sorted keys, compact, ASCII): format = "edgecl-weights-patch",
                 format_version, from_sha256, to_sha256, size (the bytes of both files, a multiple
                 of 4), and per version:
    version 2, mode "mask-int4" (the release's own step, ``make_step_patch``): mask_sha256 (the
                 mask.safetensors the device holds), k (its K), values (n), block. The rest: zlib
                 of a bitmap over the mask's K elements (K/8 bytes, little bit order: where the
                 released step has a value), the n int4 values (-7..7) two per byte as a delta
                 packs them (value 2i in the low nibble; an odd count leaves the last high one
                 0), and ceil(n / block) bfloat16 scales (the high 16 bits of a float32) as 2
                 byte planes. The rule, for every one of the K elements (in the mask's order, at
                 its tensor's offset in the file): new = float32(old + float32(q) * scale), with
                 0 where the bitmap has no value: the rule the host applied when it built the
                 released weights (``ReleasedStep``), so the device's result is byte-identical.
                 Where the step is non-zero is also where the mask's overlap counts grow
                 (``patched_mask``).
    version 1, words N and mode ("add" or "xor", ``make_patch``): zlib of the gaps between the N
                 changed word positions (uint32: the first position + 1, then each difference),
                 then the changes (4 bytes each): "add", float32 steps, new = float32(old + step);
                 "xor", new = old XOR change. Both arrays as 4 byte planes.

Version 2 names its positions by the mask the device already holds (one bit per selected element
instead of 4-byte gaps) and its values in the devices' own int4 quantization (half a byte per value
against a float32 step): EfficientNet-Lite0's gate-made v2 goes from 216 kB (version 1) to 56 kB.
Byte planes because the steps of one delta share few exponents and the gaps' high bytes are mostly
zero: zlib codes those planes in a few bytes. numpy and the
stdlib only: the device applies it. ``apply_patch`` refuses a patch for another file (or another
mask), one that decodes past its declared size, and a result whose sha256 is not ``to_sha256``;
the caller also checks the result against the signed manifest and falls back to the whole file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecl.errors import EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.delta import Delta, pack_int4, unpack_int4
from edgecl.formats.hashing import sha256_file
from edgecl.formats.mask import Mask
from edgecl.formats.weights import tensor_offsets

MAGIC = b"ECLPATCH"
FORMAT = "edgecl-weights-patch"
FORMAT_VERSION = 2                   # the version make_step_patch writes; make_patch writes 1
READ_FORMAT_VERSIONS = (1, 2)
MODE_STEP = "mask-int4"
MAX_HEADER_BYTES = 4096
# A patch larger than this share of the file it makes is not worth a second download.
MAX_PATCH_SHARE = 0.5
# The released step's quantization: int4 in blocks of 64 values, as a device's delta is by default
# (edgecl/device/deltafile.py DEFAULT_VALUES; B3: 0.0-0.4 points from fp32).
STEP_QMAX = 7
STEP_BLOCK = 64
_REFUSED = "refused: the whole file is downloaded"


class PatchError(EdgeclError):
    """A patch that is malformed, for another file, or does not produce the file it names."""


def patch_name(from_sha256: str) -> str:
    """The patch's file name in a release (a plain name the server stores beside the bundle's files)."""
    return f"weights.from-{from_sha256[:16]}.patch"


# -- the released step: what the host applies and the device re-applies, bit for bit -------------------
@dataclass(frozen=True)
class ReleasedStep:
    """The weight change a release moves, over the K elements of the devices' mask: int4 values
    (-7..7) with one scale (a float32 that bfloat16 holds exactly) per ``block`` consecutive values,
    stored where the merged delta is non-zero (``support``), as a device's int4 delta stores its values."""

    support: np.ndarray      # bool [K]
    q: np.ndarray            # int8 [n], n = support.sum()
    scales: np.ndarray       # float32 [ceil(n / block)]
    block: int = STEP_BLOCK

    def values(self) -> np.ndarray:
        """float32 [K]: float32(q) * scale where the step has a value, 0 elsewhere (IEEE float32
        products: the same bits on every machine). The released weights are float32(W + values)."""
        out = np.zeros(self.support.size, np.float32)
        out[self.support] = self.q.astype(np.float32) * np.repeat(self.scales, self.block)[:self.q.size]
        return out


def _bfloat16_up(scales: np.ndarray) -> np.ndarray:
    """float32 scales rounded up to bfloat16 (the high 16 bits of a float32; the patch stores those):
    half the bytes of a scale, and rounding up never pushes a value past +-7."""
    high = ((scales.astype("<f4").view("<u4").astype(np.uint64) + 0xFFFF) >> 16).astype("<u4")
    high = np.minimum(high, 0x7F7F)          # the largest finite bfloat16, never infinity
    return (high << 16).view("<f4")


def quantize_step(merged: np.ndarray, block: int = STEP_BLOCK) -> ReleasedStep:
    """The merged delta [K] in the devices' int4 quantization (symmetric, one scale per ``block``
    consecutive non-zero values, as formats/delta.py encodes a delta's int4 values), the scale
    max|block| / 7 rounded up to bfloat16 precision (0.4%: the step moves by 0.05% in L2)."""
    merged = np.asarray(merged, np.float32).reshape(-1)
    support = merged != 0
    values = merged[support]
    n_blocks = -(-values.size // block)
    padded = np.zeros(n_blocks * block, np.float32)
    padded[:values.size] = values
    scales = _bfloat16_up((np.abs(padded.reshape(n_blocks, block)).max(axis=1, initial=np.float32(0))
                           / np.float32(STEP_QMAX)).astype("<f4"))
    per_value = np.repeat(scales, block)[:values.size]
    ratio = np.divide(values, per_value, out=np.zeros_like(values), where=per_value > 0)
    q = np.clip(np.rint(ratio), -STEP_QMAX, STEP_QMAX).astype(np.int8)
    return ReleasedStep(support, q, scales, block)


def released_delta(merged: Delta, step: ReleasedStep) -> Delta:
    """``merged`` with its values replaced by the released step's (what `edgecl release` applies)."""
    values = step.values()
    positions = np.flatnonzero(values).astype(np.int32)
    return dataclasses.replace(merged, positions=positions, values=values[positions])


# -- version 2: the step against the device's mask ----------------------------------------------------
def _element_words(weights: bytes, mask: Mask) -> np.ndarray:
    """int64 [K]: the 4-byte word of the weights file holding each of the mask's elements, in delta order."""
    try:
        offsets = tensor_offsets(weights)
    except (ValueError, KeyError, TypeError, IndexError) as exc:   # JSON errors are ValueErrors
        raise PatchError(f"the weights file's header is unreadable ({exc})", _REFUSED) from exc
    parts = []
    for name in mask.order:
        numel = int(np.prod(mask.shapes[name])) if mask.shapes[name] else 1
        start, length = offsets.get(name, (-1, -1))
        if start < 0 or start % 4 or length != 4 * numel or start + length > len(weights):
            raise PatchError(f"the weights file does not hold the mask's tensor {name} as float32", _REFUSED)
        parts.append(start // 4 + mask.indices[name].astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def make_step_patch(old: bytes, new: bytes, mask: bytes, step: ReleasedStep) -> bytes | None:
    """The version 2 patch that turns ``old`` into ``new`` by ``step`` over ``mask`` (the mask.safetensors
    the devices hold); None when that rule does not give ``new`` bit for bit (then version 1 serves)."""
    parsed = Mask.from_bytes(mask)
    scale_bits = step.scales.astype("<f4").view("<u4")
    if (len(old) != len(new) or len(old) % 4 or step.support.size != parsed.total_selected
            or (scale_bits & 0xFFFF).any()):     # a scale the patch's bfloat16 cannot hold
        return None
    bitmap = np.packbits(step.support, bitorder="little")
    high = (scale_bits >> 16).astype("<u2")
    body = bitmap.tobytes() + pack_int4(step.q).tobytes() + high.view(np.uint8).reshape(-1, 2).T.tobytes()
    header = _header({"format_version": 2, "mode": MODE_STEP, "from_sha256": _sha(old), "to_sha256": _sha(new),
                      "size": len(old), "mask_sha256": _sha(mask), "k": int(step.support.size),
                      "values": int(step.q.size), "block": int(step.block)})
    patch = MAGIC + len(header).to_bytes(8, "little") + header + zlib.compress(body, 9)
    try:
        return patch if apply_patch(old, patch, mask) == new else None
    except PatchError:
        return None


def _decode_step(patch: bytes, header: dict) -> ReleasedStep:
    k, n, block = header["k"], header["values"], header["block"]
    n_scales = -(-n // block)
    bitmap_bytes = -(-k // 8)
    packed = -(-n // 2)
    body = _inflate(patch, bitmap_bytes + packed + 2 * n_scales)
    bits = np.unpackbits(np.frombuffer(body[:bitmap_bytes], np.uint8), bitorder="little")
    support = bits[:k].astype(bool)
    if bits[k:].any() or int(support.sum()) != n:
        raise PatchError("the weights patch's bitmap does not mark its values", _REFUSED)
    nibbles = np.frombuffer(body[bitmap_bytes:bitmap_bytes + packed], np.uint8)
    q = unpack_int4(nibbles, n)
    high = np.frombuffer(body[bitmap_bytes + packed:], np.uint8).reshape(2, n_scales).T.copy().view("<u2")
    scales = (high.reshape(-1).astype("<u4") << 16).view("<f4")
    if ((q < -STEP_QMAX).any() or (n % 2 and nibbles[-1] >> 4) or not np.isfinite(scales).all()
            or (scales < 0).any()):
        raise PatchError("the weights patch holds a value outside int4 or a bad scale", _REFUSED)
    return ReleasedStep(support, q, scales, block)


def _mask_of(mask: bytes | None, header: dict) -> Mask:
    if mask is None or _sha(mask) != header["mask_sha256"]:
        raise PatchError("the weights patch was made against another mask", _REFUSED)
    try:
        parsed = Mask.from_bytes(mask)
    except EdgeclError as exc:
        raise PatchError(f"the mask the weights patch refers to is unreadable ({exc.problem})", _REFUSED) from exc
    if parsed.total_selected != header["k"]:
        raise PatchError("the weights patch's K is not the mask's", _REFUSED)
    return parsed


def patched_mask(mask: bytes, patch: bytes) -> bytes:
    """The next version's mask.safetensors from the device's (``mask``) and a version 2 patch: the same
    elements, each overlap count +1 where the step is non-zero (edgecl/formats/overlap.py
    ``round_increment``, the rule the host's apply follows). The caller checks it against the signed
    manifest: a release that also chose a new mask gives another file, which is then downloaded."""
    header = read_header(patch)
    if header["format_version"] != 2:
        raise PatchError("a version 1 weights patch says nothing about the mask", _REFUSED)
    parsed = _mask_of(mask, header)
    changed = _decode_step(patch, header).values() != 0
    overlap = {name: parsed.overlap[name] + changed[sl].astype(np.int32) for name, sl in parsed.slices().items()}
    return Mask(order=list(parsed.order), shapes=dict(parsed.shapes), indices=dict(parsed.indices),
                total_params=parsed.total_params, overlap=overlap).to_bytes()


# -- version 1: any word-for-word change ----------------------------------------------------------------
def make_patch(old: bytes, new: bytes) -> bytes | None:
    """The version 1 patch that turns ``old`` into ``new``; None when the files differ in size (another
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
    header = _header({"format_version": 1, "from_sha256": _sha(old), "to_sha256": _sha(new), "size": len(old),
                      "words": int(len(positions)), "mode": mode})
    return MAGIC + len(header).to_bytes(8, "little") + header + zlib.compress(body, 9)


def _header(fields: dict) -> bytes:
    return json.dumps({"format": FORMAT, **fields}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(patch: bytes) -> dict:
    """The patch's header, checked (PatchError otherwise)."""
    if len(patch) < 16 or patch[:8] != MAGIC:
        raise PatchError("the weights patch does not start with ECLPATCH", _REFUSED)
    length = int.from_bytes(patch[8:16], "little")
    if length > MAX_HEADER_BYTES or 16 + length > len(patch):
        raise PatchError(f"the weights patch declares a {length}-byte header", _REFUSED)
    try:
        header = json.loads(patch[16:16 + length])
    except ValueError:
        header = None
    if isinstance(header, dict) and header.get("format_version") not in READ_FORMAT_VERSIONS:
        raise PatchError(f"the weights patch has format version {str(header.get('format_version'))[:16]}, this "
                         f"edgecl reads {READ_FORMAT_VERSIONS}", _REFUSED)
    ok = (isinstance(header, dict) and header.get("format") == FORMAT
          and all(isinstance(header.get(k), str) and len(header[k]) == 64 for k in ("from_sha256", "to_sha256"))
          and _whole(header.get("size")) and header["size"] % 4 == 0)
    if ok and header["format_version"] == 1:
        ok = (_whole(header.get("words")) and header["words"] <= header["size"] // 4
              and header.get("mode") in ("xor", "add"))
    elif ok:
        ok = (header.get("mode") == MODE_STEP and isinstance(header.get("mask_sha256"), str)
              and len(header["mask_sha256"]) == 64
              and all(_whole(header.get(k)) for k in ("k", "values", "block"))
              and header["k"] <= header["size"] // 4 and header["values"] <= header["k"] and header["block"] >= 1)
    if not ok:
        raise PatchError("the weights patch's header is malformed", _REFUSED)
    return header


def _inflate(patch: bytes, expected: int) -> bytes:
    """The patch's body, exactly ``expected`` bytes (never more is decompressed: a zlib bomb stops there)."""
    z = zlib.decompressobj()
    try:
        body = z.decompress(patch[16 + int.from_bytes(patch[8:16], "little"):], expected + 1)
    except zlib.error as exc:
        raise PatchError(f"the weights patch does not decompress ({exc})", _REFUSED) from exc
    if len(body) != expected or not z.eof or z.unconsumed_tail or z.unused_data:
        raise PatchError("the weights patch's body is not the size its header says", _REFUSED)
    return body


def apply_patch(old: bytes, patch: bytes, mask: bytes | None = None) -> bytes:
    """``old`` with the patch applied; PatchError unless ``old`` is the file the patch was made
    from (and, for version 2, ``mask`` the mask.safetensors it names) and the result hashes to the
    patch's ``to_sha256``."""
    header = read_header(patch)
    if len(old) != header["size"] or _sha(old) != header["from_sha256"]:
        raise PatchError("the weights patch was made for another weights file", _REFUSED)
    words = np.frombuffer(old, "<u4").copy()
    if header["format_version"] == 2:
        elements = _element_words(old, _mask_of(mask, header))
        values = _decode_step(patch, header).values()
        floats = words.view("<f4")
        with np.errstate(all="ignore"):   # IEEE float32 addition, at every element: mask.scatter's rule
            floats[elements] = floats[elements] + values
    else:
        n = header["words"]
        body = _inflate(patch, 8 * n)   # two uint32 arrays of n values
        gaps, changes = _unplanes(body[:4 * n], n), _unplanes(body[4 * n:], n)
        if n and (gaps.min() < 1):
            raise PatchError("the weights patch's positions do not increase", _REFUSED)
        positions = np.cumsum(gaps.astype(np.int64)) - 1
        if n and positions[-1] >= header["size"] // 4:
            raise PatchError("the weights patch writes past the end of the file", _REFUSED)
        if header["mode"] == "xor":
            words[positions] ^= changes
        else:
            with np.errstate(all="ignore"):   # IEEE float32 addition: the same bits on every machine
                words[positions] = (words[positions].view("<f4") + changes.view("<f4")).astype("<f4").view("<u4")
    new = words.tobytes()
    if _sha(new) != header["to_sha256"]:
        raise PatchError("the patched weights do not hash to the patch's to_sha256", _REFUSED)
    return new


def attach_weights_patch(bundle_dir: str | Path, old_weights: str | Path, step: ReleasedStep | None = None,
                         old_mask: str | Path | None = None) -> str | None:
    """Release time: write the patch from ``old_weights`` (what the devices run now) to the
    bundle's ``weights.safetensors`` into the bundle, list it in the manifest's ``server_files``,
    ``sizes`` and ``weights_patches``, and rewrite the manifest (before it is signed). With the
    released ``step`` and the devices' ``old_mask``, a version 2 patch when that step made the
    weights (bit for bit), else version 1. Returns the patch's name; None (nothing written) when
    the weights did not change, no word-for-word patch exists, or the patch would not be much
    smaller than the file."""
    bundle_dir = Path(bundle_dir)
    old, new = Path(old_weights).read_bytes(), (bundle_dir / mf.WEIGHTS).read_bytes()
    manifest = mf.load_manifest(bundle_dir)
    if manifest.files.get(mf.WEIGHTS) != _sha(new):
        raise PatchError(f"{bundle_dir / mf.WEIGHTS} does not match its manifest", "build the bundle again")
    if old == new:
        return None
    patch = (make_step_patch(old, new, Path(old_mask).read_bytes(), step)
             if step is not None and old_mask is not None else None)
    patch = patch or make_patch(old, new)
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
