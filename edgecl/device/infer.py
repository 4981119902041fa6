"""Inference on the device: embeddings, `edgecl predict` and `edgecl eval` (onnxruntime only).

Two heads (docs/method.md#step-4; ``--head``):
- ``ncm`` (SimpleCIL): cosine similarity between an image's raw pooled embedding and each class
  prototype, computed inside ``inference.onnx`` (output ``logits``);
- ``lda``: linear discriminant scores from the pooled within-class covariance and class means that
  `edgecl adapt` keeps (``heads.LdaHead``; a class it has no mean of uses its prototype), in numpy
  on the embeddings.
``auto`` (the default) is lda when the state has covariance statistics, else ncm.

Each predicted class carries its raw ``score`` and a ``probability``: the softmax over all classes
of the head's scores. For lda the scores are Gaussian log-likelihoods up to a shared constant
(shared covariance, equal priors), so the softmax is that model's posterior. For ncm the cosine
scores (in [-1, 1]) are divided by ``NCM_TEMPERATURE`` first; that temperature is a fixed choice,
not fitted to this bundle's data, so read an ncm probability as a confidence on a common scale
(the ranking is the scores'), not as a measured frequency of being right.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import BundleError, DataError, DeviceError, EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile, default_profile, load_profile, profile_from_dict
from edgecl.formats.images import load_image_folder, load_rgb
from edgecl.formats.preprocess import Preprocess
from edgecl.formats.prototypes import Prototypes
from edgecl.progress import progress_bar

from .heads import LdaHead
from .state import INFERENCE_FILES, Bundle, DeviceState, load_current, open_bundle, save_verified

# auto: lda when the state has its statistics, else ncm; ncm: cosine to the class prototypes;
# lda: linear discriminant with the pooled within-class covariance. (cli/choices.py mirrors these.)
HEADS = ("auto", "ncm", "lda")

# Softmax temperature of the ncm head's cosine scores. A cosine gap of 0.1 between two classes is
# then an odds ratio of e^2 = 7.4; 0.05 sits in the range cosine classifiers are trained at (SupCon
# 0.07, CosFace-style scales s = 10..30 i.e. T = 0.1..0.03). Fixed, not fitted: see the module doc.
NCM_TEMPERATURE = 0.05

_INFER_BATCH = 64  # images per inference call: bounds activation memory, independent of the train batch


def resolve_profile(profile: str | Path | DeviceProfile | None, bundle: Bundle | None = None) -> DeviceProfile:
    """The profile to run with: an explicit one (``--device``) > the bundle's own (the profile it was
    exported for, ``manifest.device_profile``) > the built-in default.

    So ``store_images = false`` at export holds on the device without repeating ``--device``."""
    if isinstance(profile, DeviceProfile):
        return profile
    if profile is not None:
        return load_profile(profile)
    if bundle is not None and bundle.manifest.device_profile:
        return profile_from_dict(bundle.manifest.device_profile, f"{bundle.path(mf.MANIFEST)} device_profile")
    return default_profile()


@contextmanager
def _one_line_runtime_errors(what: str) -> Iterator[None]:
    """onnxruntime's own exceptions (bad graph, wrong shapes, provider failures) as one BundleError line."""
    try:
        yield
    except EdgeclError:
        raise
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise  # our bug: keep the traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BundleError(f"onnxruntime failed on {what} ({first[:200]})",
                          "re-copy the bundle from the host; if it persists, re-export it") from exc


def create_runner(bundle: Bundle, profile: DeviceProfile):  # noqa: ANN201 - InferenceRunner
    from .ort import InferenceRunner  # the one module touching onnxruntime
    with _one_line_runtime_errors(mf.INFERENCE_MODEL):
        return InferenceRunner(bundle.path(mf.INFERENCE_MODEL), bundle.path(mf.WEIGHTS), bundle.mask,
                               threads=profile.threads, provider=profile.execution_provider)


def embed_and_score(runner, bundle: Bundle, pixels: np.ndarray, delta: np.ndarray,  # noqa: ANN001
                    prototypes: np.ndarray | None = None,
                    on_batch: Callable[[int], Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> (embeddings [N, D], logits [N, C]) in batches; ``on_batch(n)`` after each."""
    m = bundle.manifest
    preprocess = Preprocess.of(m)
    protos = prototypes if prototypes is not None and len(prototypes) else np.ones((1, m.embedding_dim), np.float32)
    embeddings, logits = [], []
    for start in range(0, len(pixels), _INFER_BATCH):
        batch = pixels[start:start + _INFER_BATCH]
        with _one_line_runtime_errors(mf.INFERENCE_MODEL):
            e, s = runner.run(preprocess(batch), delta, protos)
        embeddings.append(e)
        logits.append(s)
        if on_batch is not None:
            on_batch(len(batch))
    if not embeddings:
        return np.zeros((0, m.embedding_dim), np.float32), np.zeros((0, len(protos)), np.float32)
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(logits).astype(np.float32)


def _need_prototypes(prototypes: Prototypes, bundle: Bundle) -> None:
    if len(prototypes) == 0:
        raise DeviceError(f"{bundle.root} has no class prototypes yet",
                          "run `edgecl adapt BUNDLE --data DIR --epochs 0` to add classes")


def resolve_head(state: DeviceState, head: str | Enum) -> str:
    head = head.value if isinstance(head, Enum) else head
    if head not in HEADS:
        raise DeviceError(f"unknown head {head!r}", f"pass one of {', '.join(HEADS)}")
    if head == "auto":
        return "lda" if state.lda_path is not None else "ncm"
    if head == "lda" and state.lda_path is None:
        raise DeviceError("this state has no LDA statistics (they are made by `edgecl adapt`)",
                          "run `edgecl adapt BUNDLE --data DIR` (--epochs 0 is enough), or use --head ncm")
    return head


def classify(runner, bundle: Bundle, state: DeviceState, pixels: np.ndarray, head: str | Enum,  # noqa: ANN001
             shrinkage: float | None = None, on_batch: Callable[[int], Any] | None = None) -> tuple[str, np.ndarray]:
    """(the head used, scores [N, C] in the order of state.prototypes.classes)."""
    used = resolve_head(state, head)
    embeddings, logits = embed_and_score(runner, bundle, pixels, state.delta, state.prototypes.means, on_batch)
    if used == "lda":
        assert state.lda_path is not None  # resolve_head returns lda only when the state has the file
        lda = LdaHead.load_file(state.lda_path) if shrinkage is None else LdaHead.load_file(state.lda_path, shrinkage)
        means = lda.means_for(state.prototypes.classes, state.prototypes.means)
        logits = lda.logits(embeddings, means).astype(np.float32)
    return used, logits


def probabilities(scores: np.ndarray, head: str) -> np.ndarray:
    """Softmax over classes of [N, C] scores (ncm: cosine / NCM_TEMPERATURE; lda: the scores as they are).

    A row with a non-finite score (a zero embedding has no cosine) gives NaN probabilities."""
    z = np.asarray(scores, np.float64) / (NCM_TEMPERATURE if head == "ncm" else 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def finite_or_none(value: float) -> float | None:
    """A JSON-safe number: NaN and infinities become None (null), never a bare NaN token."""
    value = float(value)
    return value if np.isfinite(value) else None


def predict(bundle_dir: str | Path, images: Sequence[str | Path], top_k: int = 3,
            profile: str | Path | DeviceProfile | None = None, head: str | Enum = "auto") -> list[dict[str, Any]]:
    """Class, score, probability and top-k for each image file. Unreadable files are reported, not fatal.

    The score is the cosine similarity (ncm) or the linear discriminant score (lda); ``probability``
    is the softmax described in the module doc. Non-finite numbers are None."""
    if top_k < 1:
        raise DataError(f"--top-k {top_k} is less than 1", "pass --top-k 1 or more")
    bundle = open_bundle(bundle_dir, uses=INFERENCE_FILES)
    prof = resolve_profile(profile, bundle)
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
    probs = probabilities(logits, used)
    k = min(top_k, len(state.prototypes))
    for row, scores, p in zip(rows, logits, probs, strict=True):
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]
        top = [{"class": state.prototypes.classes[j], "score": finite_or_none(scores[j]),
                "probability": finite_or_none(p[j])} for j in order]
        results[row].update({"class": top[0]["class"], "score": top[0]["score"],
                             "probability": top[0]["probability"], "top_k": top, "head": used,
                             "state": state.generation or "bundle"})
    save_verified(bundle)
    return results


def evaluate(bundle_dir: str | Path, data_dir: str | Path | Sequence[str | Path],
             profile: str | Path | DeviceProfile | None = None, most_confused: int = 5,
             head: str | Enum = "auto", progress: bool = True) -> dict[str, Any]:
    """Accuracy overall and per class, and the most confused (true, predicted) pairs.

    ``data_dir`` may be several folders (e.g. each task's test split): each is scored and reported
    under ``folders``, and the top-level numbers pool all their images."""
    folders = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    if not folders:
        raise DataError("no image folder given", "pass --data DIR (several --data are evaluated together)")
    bundle = open_bundle(bundle_dir, uses=INFERENCE_FILES)
    prof = resolve_profile(profile, bundle)
    state = load_current(bundle)
    _need_prototypes(state.prototypes, bundle)
    used = resolve_head(state, head)
    m = bundle.manifest
    loaded = []
    for folder in folders:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "skipped ")  # the skip count is in the report
            data = load_image_folder(folder, m.input_size, m.interpolation, progress=progress,
                                     desc=f"decode {Path(folder).name}")
        known = np.asarray([c in state.prototypes.classes for c in data.classes])
        rows = np.flatnonzero(known[data.labels])
        if not len(rows):
            raise DataError(f"no class in {folder} has a prototype (classes: {', '.join(data.classes)})",
                            "adapt on these classes first: `edgecl adapt BUNDLE --data DIR`")
        unknown = [c for c, ok in zip(data.classes, known, strict=True) if not ok]
        if unknown:
            warnings.warn(f"{len(data.labels) - len(rows)} image(s) in {folder} of class(es) without a prototype "
                          f"not scored: {', '.join(unknown)}", stacklevel=2)
        loaded.append((folder, data, rows, unknown))
    runner = create_runner(bundle, prof)
    reports, all_truth, all_predicted = [], [], []
    with progress_bar(sum(len(rows) for _, _, rows, _ in loaded), "eval", enabled=progress) as bar:
        for folder, data, rows, unknown in loaded:
            _, logits = classify(runner, bundle, state, data.pixels[rows], used, on_batch=bar.update)
            predicted = [state.prototypes.classes[j] for j in np.nan_to_num(logits, nan=-np.inf).argmax(axis=1)]
            truth = [data.classes[data.labels[r]] for r in rows]
            report = _accuracy_report(truth, predicted, most_confused)
            report.update({"data": str(folder), "skipped_unreadable": len(data.skipped),
                           "skipped_unknown_class": int(len(data.labels) - len(rows)), "unknown_classes": unknown})
            reports.append(report)
            all_truth += truth
            all_predicted += predicted
    overall = _accuracy_report(all_truth, all_predicted, most_confused)
    overall.update({
        "skipped_unreadable": sum(r["skipped_unreadable"] for r in reports),
        "skipped_unknown_class": sum(r["skipped_unknown_class"] for r in reports),
        "unknown_classes": sorted({c for r in reports for c in r["unknown_classes"]}),
        "state": state.generation or "bundle",
        "head": used,
        "folders": reports,
    })
    save_verified(bundle)
    return overall


def _accuracy_report(truth: list[str], predicted: list[str], most_confused: int) -> dict[str, Any]:
    correct = np.asarray([p == t for p, t in zip(predicted, truth, strict=True)])
    per_class = {}
    for name in sorted(set(truth)):
        sel = np.asarray([t == name for t in truth])
        per_class[name] = {"accuracy": float(correct[sel].mean()), "images": int(sel.sum()),
                           "correct": int(correct[sel].sum())}
    confusions = Counter((t, p) for t, p in zip(truth, predicted, strict=True) if t != p)
    return {
        "accuracy": float(correct.mean()),
        "images": int(len(truth)),
        "correct": int(correct.sum()),
        "per_class": per_class,
        "most_confused": [{"true": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common(most_confused)],
    }
