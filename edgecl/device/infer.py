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
scores (in [-1, 1]) are divided by ``NCM_TEMPERATURE`` first. When the state carries a calibration
record (``unknown.calibrate``: the LDA statistics' own, written by `edgecl adapt`, or for the bundle's
own state the one `edgecl export` wrote), each head's scores are divided by the temperature fitted on
held-out images instead, so a probability is a measured frequency of being right (ECE on
Fashion-MNIST: benchmarks/b8_b9_floor/). Without one the raw softmax stays: read it as a confidence on a
common scale (the ranking is the scores'), not as a frequency.

Each image also gets an ``unknown_score`` (higher = less like any known class; ``unknown.py``) and
``unknown``: whether it is above the calibrated threshold (None when the state has no calibration).
``ServingState`` is a state prepared once for all of that, so `edgecl watch` scores a batch without
reloading or refactoring the statistics.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import BundleError, DataError, DeviceError, EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.calibration import (
    CALIBRATION_FILE,
    NCM_TEMPERATURE,
    SCORE_COSINE,
    SCORE_RELATIVE_MAHALANOBIS,
    auroc,
    check_record,
    softmax,
)
from edgecl.formats.config import DeviceProfile, default_profile, load_profile, profile_from_dict
from edgecl.formats.images import IMAGE_SUFFIXES, load_image_folder, load_rgb
from edgecl.formats.preprocess import Preprocess
from edgecl.formats.prototypes import Prototypes
from edgecl.progress import progress_bar

from .heads import LdaHead, fleet_head
from .state import INFERENCE_FILES, DeviceState, OpenBundle, load_current, open_bundle, save_verified
from .unknown import MahalanobisScorer

# auto: lda when the state has its statistics, else ncm; ncm: cosine to the class prototypes;
# lda: linear discriminant with the pooled within-class covariance. (cli/options.py mirrors these.)
HEADS = ("auto", "ncm", "lda")

_INFER_BATCH = 64  # images per inference call: bounds activation memory, independent of the train batch


def resolve_profile(profile: str | Path | DeviceProfile | None, bundle: OpenBundle | None = None) -> DeviceProfile:
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


def create_runner(bundle: OpenBundle, profile: DeviceProfile, batch: int | None = None,  # noqa: ANN201 - InferenceRunner
                  spin: bool = True):
    """The inference runner; ``batch``: the batch size most calls will use (a session with it fixed
    runs them, ort.InferenceRunner); ``spin`` False: onnxruntime's threads sleep between operators
    instead of busy-waiting (a server that decodes the next batch meanwhile: watch)."""
    from .ort import InferenceRunner  # the one module touching onnxruntime
    with _one_line_runtime_errors(mf.INFERENCE_MODEL):
        return InferenceRunner(bundle.path(mf.INFERENCE_MODEL), bundle.path(mf.WEIGHTS), bundle.mask,
                               threads=profile.threads, provider=profile.execution_provider, batch=batch,
                               spin=spin)


def warm_runner(runner, bundle: OpenBundle, delta: np.ndarray) -> None:  # noqa: ANN001
    """Build the runner's sessions at ``delta`` before the first real image (ort.InferenceRunner.warm)."""
    m = bundle.manifest
    with _one_line_runtime_errors(mf.INFERENCE_MODEL):
        runner.warm(delta, m.embedding_dim, m.input_size)


def embed_and_score(runner, bundle: OpenBundle, pixels: np.ndarray, delta: np.ndarray,  # noqa: ANN001
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


def embed_own_weights(bundle: OpenBundle, pixels: np.ndarray) -> np.ndarray:
    """Embeddings [N, D] of uint8 ``pixels`` under ``bundle``'s own weights (no device delta), on a
    runner opened for this call and released after it."""
    runner = create_runner(bundle, resolve_profile(None, bundle))
    try:
        return embed_and_score(runner, bundle, pixels, np.zeros(bundle.mask.total_selected, np.float32))[0]
    finally:
        runner.release()


def need_prototypes(prototypes: Prototypes, bundle: OpenBundle) -> None:
    if len(prototypes) == 0:
        raise DeviceError(f"{bundle.root} has no class prototypes yet",
                          "run `edgecl adapt BUNDLE --data DIR --epochs 0` to add classes")


def has_lda(state: DeviceState, bundle: OpenBundle | None) -> bool:
    return state.lda_path is not None or (bundle is not None and bundle.path(mf.FLEET_SCATTER).exists())


def state_lda(bundle: OpenBundle, state: DeviceState, shrinkage: float | None = None) -> LdaHead | None:
    """The LDA statistics a state serves with: its own (every adapt makes them), else those its bundle
    ships (a released version judged with the LDA head: the fleet's pooled scatter); None: neither."""
    kw = {} if shrinkage is None else {"shrinkage": shrinkage}
    if state.lda_path is not None:
        return LdaHead.load_file(state.lda_path, **kw)
    if bundle.path(mf.FLEET_SCATTER).exists():
        return fleet_head(bundle.path(mf.FLEET_SCATTER), bundle.manifest.embedding_dim, **kw)
    return None


def resolve_head(state: DeviceState, head: str | Enum, bundle: OpenBundle | None = None) -> str:
    head = head.value if isinstance(head, Enum) else head
    if head not in HEADS:
        raise DeviceError(f"unknown head {head!r}", f"pass one of {', '.join(HEADS)}")
    if head == "auto":
        return "lda" if has_lda(state, bundle) else "ncm"
    if head == "lda" and not has_lda(state, bundle):
        raise DeviceError("this state has no LDA statistics (they are made by `edgecl adapt`)",
                          "run `edgecl adapt BUNDLE --data DIR` (--epochs 0 is enough), or use --head ncm")
    return head


@dataclass
class Scored:
    """One batch through a ServingState: rows in the order of the pixels given."""
    embeddings: np.ndarray          # [N, D]
    scores: np.ndarray              # [N, C] the head's scores, in state.prototypes.classes order
    probabilities: np.ndarray       # [N, C] softmax(scores / the head's temperature)
    unknown_scores: np.ndarray      # [N] higher = less like any known class
    unknown: np.ndarray | None      # [N] bool: above the calibrated threshold; None without calibration


@dataclass
class ServingState:
    """A committed state made ready to score embeddings: the head's statistics factored once."""
    state: DeviceState
    head: str                            # ncm | lda (resolved)
    classes: list[str]
    lda: LdaHead | None                  # the LDA statistics when the state has them (whatever the head)
    lda_means: np.ndarray | None         # [C, D] in ``classes`` order
    mahalanobis: MahalanobisScorer | None
    calibration: dict[str, Any] | None   # unknown.calibrate's record that fits this state, if any
    unknown_score: str                   # which score ``unknown_scores`` holds (unknown.SCORE_*)
    lda_linear: tuple[np.ndarray, np.ndarray] | None = None  # (weights [D, C], bias [C]): LdaHead.logits, solved once

    @classmethod
    def create(cls, bundle: OpenBundle, state: DeviceState, head: str | Enum = "auto",
               shrinkage: float | None = None) -> ServingState:
        from .ort import frozen_delta  # the one module touching onnxruntime
        used = resolve_head(state, head, bundle)
        # A read-only copy of the delta the runner knows by identity: serving does not re-hash it every batch.
        state = replace(state, delta=frozen_delta(state.delta))
        classes = list(state.prototypes.classes)
        means = scorer = None
        lda = state_lda(bundle, state, shrinkage)
        if lda is not None:
            means = lda.means_for(classes, state.prototypes.means)
            scorer = MahalanobisScorer.create(lda, means)
        score = SCORE_RELATIVE_MAHALANOBIS if scorer is not None else SCORE_COSINE
        calibration = lda.calibration if lda is not None else bundle_calibration(bundle, state)
        if calibration is not None and calibration.get("score") != score:
            calibration = None  # fitted for another score than this state computes
        linear = None
        if lda is not None and means is not None:
            weights = np.linalg.solve(lda.covariance(), means.T)  # what LdaHead.logits solves per call
            linear = (weights, -0.5 * np.einsum("cd,dc->c", means, weights))
        return cls(state, used, classes, lda, means, scorer, calibration, score, linear)

    def temperature(self, head: str | None = None) -> float:
        head = head or self.head
        fitted = (self.calibration or {}).get("temperature", {}).get(head)
        return float(fitted) if fitted else (NCM_TEMPERATURE if head == "ncm" else 1.0)

    def score(self, embeddings: np.ndarray, cosines: np.ndarray) -> Scored:
        """Embeddings [N, D] and inference.onnx's cosines [N, C] -> everything predict reports."""
        if self.head == "lda":
            assert self.lda_linear is not None
            weights, bias = self.lda_linear
            scores = (np.asarray(embeddings, np.float64) @ weights + bias).astype(np.float32)
        else:
            scores = np.asarray(cosines, np.float32)
        if self.mahalanobis is not None:
            unknown_scores = self.mahalanobis.unknown_scores(embeddings)
        else:
            with np.errstate(invalid="ignore"):
                unknown_scores = 1.0 - np.asarray(cosines, np.float64).max(axis=1)
        flags = None
        if self.calibration is not None:
            with np.errstate(invalid="ignore"):
                flags = ~(unknown_scores <= float(self.calibration["threshold"]))  # NaN counts as unknown
        return Scored(np.asarray(embeddings), scores, softmax(scores, self.temperature()), unknown_scores, flags)

    def classify(self, runner, bundle: OpenBundle, pixels: np.ndarray,  # noqa: ANN001
                 on_batch: Callable[[int], Any] | None = None) -> Scored:
        embeddings, cosines = embed_and_score(runner, bundle, pixels, self.state.delta, self.state.prototypes.means,
                                              on_batch)
        return self.score(embeddings, cosines)

    def classify_input(self, runner, images: np.ndarray) -> Scored:  # noqa: ANN001
        """One batch already preprocessed (float32 [N, 3, H, W], ``Preprocess``) -> Scored."""
        with _one_line_runtime_errors(mf.INFERENCE_MODEL):
            embeddings, cosines = runner.run(images, self.state.delta, self.state.prototypes.means)
        return self.score(embeddings, cosines)

    def top1(self, scored: Scored) -> list[tuple[str, float | None, bool | None, float | None]]:
        """Per row (class, probability, unknown, unknown_score): ``describe``'s top answer for the whole
        batch at once (the same class on ties and NaN scores; non-finite numbers are None)."""
        best = np.nan_to_num(scored.scores, nan=-np.inf).argmax(axis=1)  # describe's stable sort: first maximum
        probability = scored.probabilities[np.arange(len(best)), best]
        unknown = [None] * len(best) if scored.unknown is None else [bool(u) for u in scored.unknown]
        return [(self.classes[j], finite_or_none(p), u, finite_or_none(s))
                for j, p, u, s in zip(best.tolist(), probability.tolist(), unknown, scored.unknown_scores.tolist(),
                                      strict=True)]


def bundle_calibration(bundle: OpenBundle, state: DeviceState) -> dict[str, Any] | None:
    """The bundle's own calibration (`edgecl export`), valid only while the state is the bundle's."""
    path = bundle.path(CALIBRATION_FILE)
    if state.generation is not None or not path.is_file():
        return None
    try:
        return check_record(json.loads(path.read_text()), str(path))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is damaged ({exc})", "re-copy the bundle from the host") from exc


def classify(runner, bundle: OpenBundle, state: DeviceState, pixels: np.ndarray, head: str | Enum,  # noqa: ANN001
             shrinkage: float | None = None, on_batch: Callable[[int], Any] | None = None) -> tuple[str, np.ndarray]:
    """(the head used, scores [N, C] in the order of state.prototypes.classes)."""
    serving = ServingState.create(bundle, state, head, shrinkage)
    return serving.head, serving.classify(runner, bundle, pixels, on_batch).scores


def probabilities(scores: np.ndarray, head: str, temperature: float | None = None) -> np.ndarray:
    """Softmax over classes of [N, C] scores divided by ``temperature`` (default: the uncalibrated one,
    ncm: NCM_TEMPERATURE; lda: 1). A row with a non-finite score gives NaN probabilities."""
    return softmax(scores, temperature if temperature is not None else (NCM_TEMPERATURE if head == "ncm" else 1.0))


def finite_or_none(value: float) -> float | None:
    """A JSON-safe number: NaN and infinities become None (null), never a bare NaN token."""
    value = float(value)
    return value if math.isfinite(value) else None


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
    need_prototypes(state.prototypes, bundle)
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
    serving = ServingState.create(bundle, state, head)
    runner = create_runner(bundle, prof)
    scored = serving.classify(runner, bundle, np.stack(pixels))
    for i, row in enumerate(rows):
        results[row].update(describe(serving, scored, i, top_k))
    save_verified(bundle)
    return results


def describe(serving: ServingState, scored: Scored, i: int, top_k: int = 3) -> dict[str, Any]:
    """Row ``i`` of a scored batch as predict (and watch) report it; non-finite numbers are None."""
    scores, p = scored.scores[i], scored.probabilities[i]
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:min(top_k, len(serving.classes))]
    top = [{"class": serving.classes[j], "score": finite_or_none(scores[j]), "probability": finite_or_none(p[j])}
           for j in order]
    return {"class": top[0]["class"], "score": top[0]["score"], "probability": top[0]["probability"],
            "unknown": None if scored.unknown is None else bool(scored.unknown[i]),
            "unknown_score": finite_or_none(scored.unknown_scores[i]), "top_k": top, "head": serving.head,
            "calibrated": serving.calibration is not None, "state": serving.state.generation or "bundle"}


def evaluate(bundle_dir: str | Path, data_dir: str | Path | Sequence[str | Path],
             profile: str | Path | DeviceProfile | None = None, most_confused: int = 5,
             head: str | Enum = "auto", progress: bool = True,
             unknown_dirs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Accuracy overall and per class, and the most confused (true, predicted) pairs.

    ``data_dir`` may be several folders (e.g. each task's test split): each is scored and reported
    under ``folders``, and the top-level numbers pool all their images. ``unknown_dirs``: folders of
    images of no known class (a class folder per kind, or loose images); the report's
    ``unknown_detection`` gives the AUROC of the unknown score (known images of ``data_dir`` against
    these) and the shares flagged at the calibrated threshold."""
    folders = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    if not folders:
        raise DataError("no image folder given", "pass --data DIR (several --data are evaluated together)")
    bundle = open_bundle(bundle_dir, uses=INFERENCE_FILES)
    prof = resolve_profile(profile, bundle)
    state = load_current(bundle)
    need_prototypes(state.prototypes, bundle)
    serving = ServingState.create(bundle, state, head)
    used = serving.head
    m = bundle.manifest
    unknown_images = [_load_unknown(folder, m) for folder in unknown_dirs]
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
    reports, all_truth, all_predicted, known_scores, known_flags = [], [], [], [], []
    total = sum(len(rows) for _, _, rows, _ in loaded) + sum(len(x) for x in unknown_images)
    with progress_bar(total, "eval", enabled=progress) as bar:
        for folder, data, rows, unknown in loaded:
            scored = serving.classify(runner, bundle, data.pixels[rows], on_batch=bar.update)
            logits = scored.scores
            known_scores.append(scored.unknown_scores)
            known_flags.append(scored.unknown)
            predicted = [state.prototypes.classes[j] for j in np.nan_to_num(logits, nan=-np.inf).argmax(axis=1)]
            truth = [data.classes[data.labels[r]] for r in rows]
            report = _accuracy_report(truth, predicted, most_confused)
            report.update({"data": str(folder), "skipped_unreadable": len(data.skipped),
                           "skipped_unknown_class": int(len(data.labels) - len(rows)), "unknown_classes": unknown})
            reports.append(report)
            all_truth += truth
            all_predicted += predicted
        unknown_scored = [serving.classify(runner, bundle, pixels, on_batch=bar.update) for pixels in unknown_images]
    overall = _accuracy_report(all_truth, all_predicted, most_confused)
    if unknown_dirs:
        overall["unknown_detection"] = _unknown_report(serving, known_scores, known_flags, unknown_scored, unknown_dirs)
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


def _load_unknown(folder: str | Path, m: mf.BundleManifest) -> np.ndarray:
    """Every decodable image under ``folder`` (class sub-folders or loose files), uint8 [N, H, W, 3]."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "pass --unknown DIR, a folder of images of no known class")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    pixels = []
    for path in files:
        try:
            pixels.append(load_rgb(path, m.input_size, m.interpolation))
        except DataError:
            continue  # counted by the report as images - decoded
    if not pixels:
        raise DataError(f"no image in {root} could be decoded", "pass --unknown DIR holding image files")
    return np.stack(pixels)


def _unknown_report(serving: ServingState, known_scores: list[np.ndarray], known_flags: list[np.ndarray | None],
                    unknown_scored: list[Scored], unknown_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """AUROC of the unknown score, known images against each unknown folder and all of them, and the
    shares flagged at the calibrated threshold (None when the state has no calibration)."""
    known = np.concatenate(known_scores)
    calibrated = serving.calibration is not None

    def flagged(flags: list[np.ndarray | None]) -> float | None:
        return float(np.mean(np.concatenate([f for f in flags if f is not None]))) if calibrated else None

    folders = [{"data": str(d), "images": len(s.unknown_scores), "auroc": finite_or_none(auroc(known, s.unknown_scores)),
                "flagged": flagged([s.unknown])} for d, s in zip(unknown_dirs, unknown_scored, strict=True)]
    every = np.concatenate([s.unknown_scores for s in unknown_scored])
    return {"score": serving.unknown_score, "calibrated": calibrated,
            "threshold": serving.calibration["threshold"] if serving.calibration else None,
            "target_false_unknown_rate": serving.calibration["false_unknown_rate"] if serving.calibration else None,
            "known_images": int(len(known)), "unknown_images": int(len(every)),
            "auroc": finite_or_none(auroc(known, every)),
            "known_flagged": flagged(known_flags), "unknown_flagged": flagged([s.unknown for s in unknown_scored]),
            "folders": folders}


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
