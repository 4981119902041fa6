"""The ONE module of the device side that touches onnxruntime: plain InferenceSessions only.

Why plain onnxruntime (docs/design-notes.md): onnxruntime-training's last release was 1.19.2
(x86_64 only, no aarch64, no Python 3.13) and it ran our step 2x slower than a standard-ONNX graph
on the stock runtime. The host exports the whole training step (forward, supervised-contrastive
loss, backward) as ONE graph of standard ONNX operators, `train_step.onnx`; here it is just an
InferenceSession that maps (images, labels, row weights, delta, projection head) to (loss,
gradients). The update itself (drop gate + sparse SGD) stays in numpy (update.py).

Inference (`inference.onnx`) keeps its weights as ONNX external data inside `weights.safetensors`
(one copy of W0). After an adaptation the masked weights are W0 + scatter(delta): the device patches
them in a copy of that file's bytes and hands the buffer to onnxruntime
(``add_external_initializers_from_files_in_memory``), so they are ordinary constant weights and every
CPU fast path (NCHWc convolutions) applies. Not ``add_initializer``: x86 onnxruntime's NCHWc
transformer reads convolution weights from the model and silently ignores such overrides
(measured: 17 of 29 patched tensors of the test model ran W0).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import BundleError, DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.mask import Mask

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - the device extra installs it
    raise DeviceError(f"onnxruntime is not installed ({exc})",
                      "pip install 'edgecl[device]' (or onnxruntime-gpu on a CUDA device)") from exc


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def check_provider(provider: str) -> None:
    """A profile naming a provider this onnxruntime build lacks is a one-line error, not a crash."""
    have = available_providers()
    if provider not in have:
        raise DeviceError(f"execution provider {provider} is not available in this onnxruntime build "
                          f"(available: {', '.join(have)})",
                          "set execution_provider in the device profile to one of those, or install the "
                          "onnxruntime build that has it (onnxruntime-gpu for CUDAExecutionProvider)")


def _session_options(threads: int, spin: bool = True) -> Any:
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not spin and threads != 1:
        # watch: onnxruntime's pool threads otherwise busy-wait between operators, on the cores the
        # next batch is being decoded on. B8 at 2 threads: images/s +1% (median of 8 interleaved
        # rounds), images per CPU-second 645 -> 803. Not for a plain batch loop (eval): 4-7% slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The step graph's activations are freed as the backward consumes them; ORT's memory pattern
    # pre-plans one arena for the whole graph instead: peak RSS 975 -> 541 MB measured, no speed cost.
    options.enable_mem_pattern = False
    return options


def _open(model: Path, options: Any, provider: str, fix: str) -> Any:
    check_provider(provider)
    try:
        return ort.InferenceSession(os.fspath(model), sess_options=options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {Path(model).name} ({first[:200]})", fix) from exc


@dataclass
class StepOutput:
    loss: float
    grad_delta: np.ndarray       # [K]
    grad_proj_weight: np.ndarray  # [P, D]
    grad_proj_bias: np.ndarray    # [P]


class StepSession:
    """`train_step.onnx`: one forward + backward of the MI loss; the caller updates the values.

    The graph has a fixed row count (2 x the export batch); a smaller batch is padded with rows
    of weight 0, which the loss ignores exactly (no anchor, no positive, not in any denominator).
    """

    def __init__(self, model: Path, threads: int = 0, provider: str = "CPUExecutionProvider") -> None:
        self._session = _open(model, _session_options(threads), provider,
                              "re-copy train_step.onnx from the host (or re-export the bundle with this edgecl)")
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if tuple(inputs) != mf.STEP_INPUTS or tuple(outputs) != mf.STEP_OUTPUTS:
            raise BundleError(f"train_step.onnx has inputs {list(inputs)} and outputs {outputs}, expected "
                              f"{list(mf.STEP_INPUTS)} and {list(mf.STEP_OUTPUTS)}",
                              "re-export the bundle with this edgecl version")
        rows = inputs["images"].shape[0]
        if not isinstance(rows, int):
            raise BundleError("train_step.onnx has no fixed row count", "re-export the bundle with this edgecl")
        self.rows = int(rows)

    def step(self, images: np.ndarray, labels: np.ndarray, delta: np.ndarray, proj_weight: np.ndarray,
             proj_bias: np.ndarray) -> StepOutput:
        n = len(images)
        if n > self.rows:
            raise DeviceError(f"a step of {n} rows does not fit the bundle's step graph ({self.rows} rows)",
                              f"pass --batch-size {self.rows // 2} or less, or re-export with a larger batch")
        weight = np.zeros(self.rows, np.float32)
        weight[:n] = 1.0
        if n < self.rows:
            pad = self.rows - n
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.full(pad, -1, np.int64)])
        loss, g_delta, g_w, g_b = self._session.run(list(mf.STEP_OUTPUTS), {
            "images": np.ascontiguousarray(images, np.float32),
            "labels": np.ascontiguousarray(labels, np.int64),
            "row_weight": weight,
            "delta": np.ascontiguousarray(delta, np.float32),
            "proj_weight": np.ascontiguousarray(proj_weight, np.float32),
            "proj_bias": np.ascontiguousarray(proj_bias, np.float32)})
        return StepOutput(float(loss), g_delta, g_w, g_b)


def patched_weights(mask: Mask, base: dict[str, np.ndarray], delta: np.ndarray) -> dict[str, np.ndarray]:
    """W0 + scatter(delta) for every masked tensor whose slice of the delta is not all zero."""
    out = {}
    for name, sl in mask.slices().items():
        piece = delta[sl]
        if np.any(piece):
            w = np.array(base[name], dtype=np.float32, copy=True)
            np.add.at(w.reshape(-1), mask.indices[name].astype(np.int64), piece.astype(np.float32))
            out[name] = w
    return out


_BATCH_DIM = "batch"  # inference.onnx's free batch dimension (host/export.py's dynamic_axes)


class InferenceRunner:
    """`inference.onnx` (images, prototypes -> embeddings, cosine logits) at the current delta.

    One session per delta: rebuilt (with the patched weight bytes) only when the delta it is asked
    for changes, so embedding many batches at one delta costs one session build.

    ``batch``: the batch size most calls use (watch's ``--batch-size``, eval's chunks). Calls of
    exactly that many images run on a session with the batch dimension fixed: with every shape
    static, onnxruntime folds the exported "same" padding (timm's Conv2dSame computes it from the
    input shape at run time) into the convolutions, and the whole graph stays in its blocked NCHWc
    layout instead of converting back and forth around each Pad. Bit-identical outputs, 1.5x the
    images/s on EfficientNet-Lite0 at 64 px (benchmarks/b8_b9_floor/README.md). Other sizes run on
    the free-batch session; each session is built on first use.
    """

    def __init__(self, model: Path, weights: Path, mask: Mask, threads: int = 0,
                 provider: str = "CPUExecutionProvider", batch: int | None = None, spin: bool = True) -> None:
        check_provider(provider)
        self._model, self._weights_path, self._mask = Path(model), Path(weights), mask
        self._threads, self._provider, self._spin = threads, provider, spin
        self.batch = int(batch) if batch is not None and batch > 0 else None
        self._base: bytes | None = None
        self._offsets: dict[str, tuple[int, int]] = {}
        self._key: bytes | None = None
        self._sessions: dict[int | None, Any] = {}  # fixed batch (None: free) -> session, at delta ``_key``
        self._keepalive: Any = None
        self._disabled: list[str] = []
        self._frozen: np.ndarray | None = None  # the caller's array at ``_key`` when it cannot change (frozen_delta)

    def _patched_file(self, delta: np.ndarray) -> bytearray:
        """weights.safetensors' bytes with W0 + scatter(delta) at the masked tensors' offsets."""
        from edgecl.formats.weights import tensor_offsets
        if self._base is None:
            self._base = self._weights_path.read_bytes()
            self._offsets = tensor_offsets(self._base)
        buf = bytearray(self._base)
        for name, sl in self._mask.slices().items():
            piece = delta[sl]
            if not np.any(piece):
                continue
            offset, length = self._offsets[name]
            weight = np.frombuffer(buf, dtype="<f4", count=length // 4, offset=offset)  # a writable view
            np.add.at(weight, self._mask.indices[name].astype(np.int64), piece.astype(np.float32))
        return buf

    def _use_delta(self, delta: np.ndarray) -> None:
        """Make ``delta`` current: drop the sessions of the previous one, patch the weights once for the next.

        A delta is known by the SHA-256 of its values; a frozen array (``frozen_delta``: read-only,
        owning its values) passed again is known by identity, without hashing its K floats per call
        (B8: 0.4 ms of a 13 ms batch at Lite0's K = 167,505)."""
        if delta is self._frozen:
            return
        given = delta
        delta = np.ascontiguousarray(delta, np.float32)
        key = hashlib.sha256(delta.tobytes()).digest() if np.any(delta) else b"zero"
        frozen = given if _is_frozen(given) else None
        if key == self._key:
            self._frozen = frozen
            return
        self.release()  # the old sessions' arenas and weights go before the new ones are built
        keep: Any = None
        disabled: list[str] = []
        if key != b"zero":
            if hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory"):
                keep = np.frombuffer(self._patched_file(delta), np.uint8)
            else:
                # Older onnxruntime: override the initializers instead, with the NCHWc transformer (which
                # ignores overrides) off: correct, slower.
                keep = []
                for name, value in patched_weights(self._mask, _load_base(self._weights_path, self._mask), delta).items():
                    keep.append((name, value, ort.OrtValue.ortvalue_from_numpy(value)))
                disabled = ["NchwcTransformer"]
        # ORT borrows the buffers for the sessions' lifetime: keep them referenced with them.
        self._key, self._keepalive, self._disabled, self._frozen = key, keep, disabled, frozen

    def _session(self, fixed: int | None) -> Any:
        session = self._sessions.get(fixed)
        if session is not None:
            return session
        options = _session_options(self._threads, self._spin)
        if fixed is not None:
            options.add_free_dimension_override_by_name(_BATCH_DIM, int(fixed))
        keep = self._keepalive
        if isinstance(keep, np.ndarray):
            options.add_external_initializers_from_files_in_memory([self._weights_path.name], [keep], [len(keep)])
        elif keep:
            for name, _value, ort_value in keep:
                options.add_initializer(name, ort_value)
        session = _open_inference(self._model, options, self._provider, self._disabled)
        inputs = {i.name: i for i in session.get_inputs()}
        if set(inputs) != {"images", "prototypes"}:
            raise BundleError(f"{self._model.name} has inputs {sorted(inputs)}, expected images, prototypes",
                              "re-export the bundle with this edgecl version")
        if fixed is not None and inputs["images"].shape[0] != fixed:
            # A graph whose batch dimension has another name (or none): the override did nothing, and a
            # second free-batch session would only cost memory. Serve every size on the free one.
            self.batch = None
            return self._session(None)
        self._sessions[fixed] = session
        return session

    def warm(self, delta: np.ndarray, embedding_dim: int, input_size: tuple[int, int]) -> None:
        """Build the sessions at ``delta`` now (free batch, and the fixed one when set), so the first
        real images are answered as fast as the rest."""
        h, w = (int(s) for s in input_size)
        prototypes = np.ones((1, int(embedding_dim)), np.float32)
        for rows in sorted({1, self.batch or 1}):
            self.run(np.zeros((rows, 3, h, w), np.float32), delta, prototypes)

    def release(self) -> None:
        """Free the sessions (their arenas and weights); the next ``run`` builds them again."""
        self._sessions, self._key, self._keepalive, self._disabled, self._frozen = {}, None, None, [], None

    def run(self, images: np.ndarray, delta: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._use_delta(delta)
        fixed = self.batch if self.batch is not None and len(images) == self.batch else None
        embeddings, logits = self._session(fixed).run(["embeddings", "logits"], {
            "images": np.ascontiguousarray(images, np.float32),
            "prototypes": np.ascontiguousarray(prototypes, np.float32)})
        return embeddings, logits


def frozen_delta(delta: np.ndarray) -> np.ndarray:
    """A read-only float32 copy of ``delta`` that owns its values: nothing can change them without
    first making it writable again, so ``InferenceRunner`` recognises it by identity on every call."""
    frozen = np.array(delta, dtype=np.float32, copy=True)
    frozen.flags.writeable = False
    return frozen


def _is_frozen(delta: Any) -> bool:
    return isinstance(delta, np.ndarray) and delta.dtype == np.float32 and delta.flags.owndata \
        and not delta.flags.writeable and delta.flags.c_contiguous


def _load_base(path: Path, mask: Mask) -> dict[str, np.ndarray]:
    from edgecl.formats.weights import load_weights
    return load_weights(path, names=mask.order)


def _open_inference(model: Path, options: Any, provider: str, disabled: list[str]) -> Any:
    check_provider(provider)
    fix = "re-copy inference.onnx and weights.safetensors from the host"
    try:
        if disabled:
            return ort.InferenceSession(os.fspath(model), sess_options=options, providers=[provider],
                                        disabled_optimizers=disabled)
        return ort.InferenceSession(os.fspath(model), sess_options=options, providers=[provider])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {Path(model).name} ({first[:200]})", fix) from exc
