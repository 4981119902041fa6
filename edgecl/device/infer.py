"""Inference on the device: embeddings, `edgecl predict` and `edgecl eval` (onnxruntime only).

Two heads (METHOD.md step 4; ``--head``):
- ``ncm`` (SimpleCIL): cosine similarity between an image's raw pooled embedding and each class
  prototype, computed inside ``inference.onnx`` (output ``logits``);
- ``lda``: linear discriminant scores from the pooled within-class covariance and class means that
  `edgecl adapt` keeps (``heads.LdaHead``; a class it has no mean of uses its prototype), in numpy
  on the embeddings.
``auto`` (the default) is lda when the state has covariance statistics, else ncm.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DataError, DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile, default_profile, load_profile
from edgecl.formats.images import load_image_folder, load_rgb, normalize
from edgecl.formats.prototypes import Prototypes

from .heads import LdaHead
from .state import Bundle, DeviceState, load_current, open_bundle

HEADS = ("auto", "ncm", "lda")

_INFER_BATCH = 64  # images per inference call: bounds activation memory, independent of the train batch


def resolve_profile(profile: str | Path | DeviceProfile | None) -> DeviceProfile:
    if profile is None:
        return default_profile()
    if isinstance(profile, DeviceProfile):
        return profile
    return load_profile(profile)


def create_runner(bundle: Bundle, profile: DeviceProfile):  # noqa: ANN201 - InferenceRunner
    from .ort import InferenceRunner  # the one module touching onnxruntime
    return InferenceRunner(bundle.path(mf.INFERENCE_MODEL), bundle.path(mf.WEIGHTS), bundle.mask,
                           threads=profile.threads, provider=profile.execution_provider)


def embed_and_score(runner, bundle: Bundle, pixels: np.ndarray, delta: np.ndarray,  # noqa: ANN001
                    prototypes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> (embeddings [N, D], logits [N, C]) in batches."""
    m = bundle.manifest
    protos = prototypes if prototypes is not None and len(prototypes) else np.ones((1, m.embedding_dim), np.float32)
    embeddings, logits = [], []
    for start in range(0, len(pixels), _INFER_BATCH):
        x = normalize(pixels[start:start + _INFER_BATCH], m.mean, m.std)
        e, s = runner.run(x, delta, protos)
        embeddings.append(e)
        logits.append(s)
    if not embeddings:
        return np.zeros((0, m.embedding_dim), np.float32), np.zeros((0, len(protos)), np.float32)
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(logits).astype(np.float32)


def _need_prototypes(prototypes: Prototypes, bundle: Bundle) -> None:
    if len(prototypes) == 0:
        raise DeviceError(f"{bundle.root} has no class prototypes yet",
                          "run `edgecl adapt BUNDLE --data DIR --epochs 0` to add classes")


def resolve_head(state: DeviceState, head: str) -> str:
    if head not in HEADS:
        raise DeviceError(f"unknown head {head!r}", f"pass one of {', '.join(HEADS)}")
    if head == "auto":
        return "lda" if state.lda_path is not None else "ncm"
    if head == "lda" and state.lda_path is None:
        raise DeviceError("this state has no LDA statistics (they are made by `edgecl adapt`)",
                          "run `edgecl adapt BUNDLE --data DIR` (--epochs 0 is enough), or use --head ncm")
    return head


def classify(runner, bundle: Bundle, state: DeviceState, pixels: np.ndarray, head: str,  # noqa: ANN001
             shrinkage: float | None = None) -> tuple[str, np.ndarray]:
    """(the head used, scores [N, C] in the order of state.prototypes.classes)."""
    used = resolve_head(state, head)
    embeddings, logits = embed_and_score(runner, bundle, pixels, state.delta, state.prototypes.means)
    if used == "lda":
        lda = LdaHead.load_file(state.lda_path) if shrinkage is None else LdaHead.load_file(state.lda_path, shrinkage)
        means = lda.means_for(state.prototypes.classes, state.prototypes.means)
        logits = lda.logits(embeddings, means).astype(np.float32)
    return used, logits


def predict(bundle_dir: str | Path, images: Sequence[str | Path], top_k: int = 3,
            profile: str | Path | DeviceProfile | None = None, head: str = "auto") -> list[dict[str, Any]]:
    """Class, score and top-k for each image file. Unreadable files are reported, not fatal.

    The score is the cosine similarity (ncm) or the linear discriminant score (lda)."""
    bundle = open_bundle(bundle_dir)
    prof = resolve_profile(profile)
    state = load_current(bundle)
    _need_prototypes(state.prototypes, bundle)
    m = bundle.manifest
    results: list[dict[str, Any]] = [{"path": str(p)} for p in images]
    pixels, rows = [], []
    for i, path in enumerate(images):
        try:
            pixels.append(load_rgb(path, m.input_size, m.interpolation))
            rows.append(i)
        except DataError as exc:
            results[i]["error"] = exc.problem
    if not rows:
        raise DataError("none of the given images could be decoded", "pass readable image files")
    used = resolve_head(state, head)
    runner = create_runner(bundle, prof)
    _, logits = classify(runner, bundle, state, np.stack(pixels), used)
    k = max(1, min(top_k, len(state.prototypes)))
    for row, scores in zip(rows, logits, strict=True):
        order = np.argsort(-scores, kind="stable")[:k]
        top = [{"class": state.prototypes.classes[j], "score": float(scores[j])} for j in order]
        results[row].update({"class": top[0]["class"], "score": top[0]["score"], "top_k": top, "head": used})
    return results


def evaluate(bundle_dir: str | Path, data_dir: str | Path, profile: str | Path | DeviceProfile | None = None,
             most_confused: int = 5, head: str = "auto") -> dict[str, Any]:
    """Accuracy overall and per class, and the most confused (true, predicted) pairs."""
    bundle = open_bundle(bundle_dir)
    prof = resolve_profile(profile)
    state = load_current(bundle)
    _need_prototypes(state.prototypes, bundle)
    used = resolve_head(state, head)
    m = bundle.manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip count is in the report
        data = load_image_folder(data_dir, m.input_size, m.interpolation)
    known = [c in state.prototypes.classes for c in data.classes]
    unknown = [c for c, ok in zip(data.classes, known, strict=True) if not ok]
    rows = np.flatnonzero(np.asarray(known)[data.labels])
    if not len(rows):
        raise DataError(f"no class in {data_dir} has a prototype (classes: {', '.join(data.classes)})",
                        "adapt on these classes first: `edgecl adapt BUNDLE --data DIR`")
    if unknown:
        warnings.warn(f"{len(data.labels) - len(rows)} image(s) of class(es) without a prototype not scored: "
                      f"{', '.join(unknown)}", stacklevel=2)
    runner = create_runner(bundle, prof)
    _, logits = classify(runner, bundle, state, data.pixels[rows], used)
    predicted = [state.prototypes.classes[j] for j in logits.argmax(axis=1)]
    truth = [data.classes[data.labels[r]] for r in rows]
    correct = np.asarray([p == t for p, t in zip(predicted, truth, strict=True)])
    per_class = {}
    for name in sorted(set(truth)):
        sel = np.asarray([t == name for t in truth])
        per_class[name] = {"accuracy": float(correct[sel].mean()), "images": int(sel.sum())}
    confusions = Counter((t, p) for t, p in zip(truth, predicted, strict=True) if t != p)
    return {
        "accuracy": float(correct.mean()),
        "images": int(len(rows)),
        "correct": int(correct.sum()),
        "per_class": per_class,
        "most_confused": [{"true": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common(most_confused)],
        "skipped_unreadable": len(data.skipped),
        "skipped_unknown_class": int(len(data.labels) - len(rows)),
        "unknown_classes": unknown,
        "state": state.generation or "bundle",
        "head": used,
    }
