"""The ONE module of the device side that touches onnxruntime (training C API and inference).

Why this module exists (DESIGN.md, "onnxruntime-training 1.19.2"):
- ``import onnxruntime.training`` imports torch (its ``amp``/``optim``/``artifacts`` subpackages),
  and a device has no torch. The C++ training classes (CheckpointState, Module) are reachable
  without it through ``onnxruntime.capi._pybind_state``; we call them with the calling convention
  of the pure-python wrappers ``onnxruntime/training/api/{module,checkpoint_state}.py``.
- Even plain ``import onnxruntime`` tries ``from onnxruntime.training.ortmodule import ORTModule``
  (``capi/onnxruntime_validation.py``) and so imports torch whenever torch happens to be installed
  (a developer machine). We hide ``onnxruntime.training`` for the duration of that first import so
  the check fails fast with ImportError, which onnxruntime catches; nothing else changes.

No optimizer graph: the update step is numpy on the gradient read here (edgecl/device/update.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import BundleError, DeviceError


def _import_onnxruntime() -> Any:
    if "onnxruntime" in sys.modules:  # already imported (e.g. by the host in the same process)
        return sys.modules["onnxruntime"]
    hidden = "onnxruntime.training" not in sys.modules
    if hidden:
        sys.modules["onnxruntime.training"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import onnxruntime
    except ImportError as exc:
        raise DeviceError(f"onnxruntime is not installed ({exc})",
                          "pip install 'edgecl[device]' (onnxruntime-training-cpu==1.19.2)") from exc
    finally:
        if hidden and sys.modules.get("onnxruntime.training", 0) is None:
            del sys.modules["onnxruntime.training"]
    return onnxruntime


ort = _import_onnxruntime()
from onnxruntime.capi import _pybind_state as _C  # noqa: E402  (after the guarded import above)

_HAS_TRAINING = hasattr(_C, "Module") and hasattr(_C, "load_checkpoint")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def check_provider(provider: str) -> None:
    """A profile naming a provider this onnxruntime build lacks is a one-line error, not a crash."""
    have = available_providers()
    if provider not in have:
        raise DeviceError(f"execution provider {provider} is not available in this onnxruntime build "
                          f"(available: {', '.join(have)})",
                          "set execution_provider in the device profile to one of those, or install the "
                          "onnxruntime build that has it")


def _session_options(threads: int) -> Any:
    options = _C.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: the training graph logs every transformer at INFO
    return options


def _ort_device(provider: str) -> Any:
    # The training Module takes an OrtDevice, not a provider list (training/api/module.py).
    kind = {"CPUExecutionProvider": _C.OrtDevice.cpu, "CUDAExecutionProvider": _C.OrtDevice.cuda}.get(provider)
    if kind is None:
        raise DeviceError(f"on-device training does not support execution provider {provider}",
                          "use CPUExecutionProvider (or CUDAExecutionProvider with the CUDA build)")
    return _C.OrtDevice(kind(), _C.OrtDevice.default_memory(), 0)


class TrainingSession:
    """An onnxruntime-training Module plus its CheckpointState: forward+backward, parameter access.

    The four-line loop of ORT's examples, minus the optimizer graph: ``loss = train_step(x, y)``,
    read ``grad(name)``, write ``set_param(name, value)``, ``lazy_reset_grad()``.
    """

    def __init__(self, training_model: Path, eval_model: Path, checkpoint: Path, threads: int = 0,
                 provider: str = "CPUExecutionProvider") -> None:
        if not _HAS_TRAINING:
            raise DeviceError("this onnxruntime has no on-device training API",
                              "install onnxruntime-training-cpu==1.19.2 (not plain onnxruntime)")
        check_provider(provider)
        self._device = _ort_device(provider)
        try:
            self._state = _C.load_checkpoint(os.fspath(checkpoint))
            self._module = _C.Module(os.fspath(training_model), self._state, os.fspath(eval_model),
                                     self._device, _session_options(threads))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"onnxruntime cannot load the training artifacts ({str(exc).splitlines()[0]})",
                              "re-copy the bundle from the host (training_model.onnx, eval_model.onnx, checkpoint)") from exc

    def parameter_names(self) -> list[str]:
        return list(self._state.parameter_names())

    def trainable_names(self) -> list[str]:
        return [n for n in self.parameter_names() if self._state.get_parameter(n).requires_grad]

    def _param(self, name: str) -> Any:
        if not self._state.has_parameter(name):
            raise BundleError(f"the bundle's checkpoint has no parameter {name}", "re-export the bundle")
        return self._state.get_parameter(name)

    def get_param(self, name: str) -> np.ndarray:
        return np.array(self._param(name).data.numpy(), dtype=np.float32, copy=True)

    def set_param(self, name: str, value: np.ndarray) -> None:
        # Keep the array alive for the whole call: the OrtValue borrows its buffer.
        array = np.ascontiguousarray(value, dtype=np.float32)
        ort_value = _C.OrtValue.ortvalue_from_numpy(array, self._device)
        self._param(name).copy_from(self._state, ort_value)

    def grad(self, name: str) -> np.ndarray:
        grad = self._param(name).grad
        if not grad.has_value():
            raise DeviceError(f"no gradient for {name} yet", "call train_step first")
        return np.array(grad.numpy(), dtype=np.float32, copy=True)

    def lazy_reset_grad(self) -> None:
        self._module.lazy_reset_grad()

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> float:
        from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector
        fetches = OrtValueVector()
        self._module.train_step([np.ascontiguousarray(images, np.float32),
                                 np.ascontiguousarray(labels, np.int64)], fetches)
        return float(fetches[0].numpy())

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> float:
        from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector
        fetches = OrtValueVector()
        self._module.eval_step([np.ascontiguousarray(images, np.float32),
                                np.ascontiguousarray(labels, np.int64)], fetches)
        return float(fetches[0].numpy())

    def save_checkpoint(self, path: Path) -> None:
        """Write the ORT checkpoint (parameters, no optimizer state) to ``path``; the caller makes it atomic."""
        _C.save_checkpoint(self._state, os.fspath(path), False)

    def load_checkpoint(self, path: Path) -> None:
        """Copy the trainable parameters of another checkpoint into this session's state."""
        try:
            other = _C.load_checkpoint(os.fspath(path))
        except Exception as exc:
            raise DeviceError(f"cannot read training checkpoint {path} ({str(exc).splitlines()[0]})",
                              "run `edgecl rollback` or adapt again without --resume") from exc
        for name in other.parameter_names():
            param = other.get_parameter(name)
            if param.requires_grad and self._state.has_parameter(name):
                self.set_param(name, np.array(param.data.numpy(), copy=True))


class InferenceRunner:
    """Plain onnxruntime InferenceSession on ``inference.onnx``: images, delta, prototypes -> embeddings, logits."""

    def __init__(self, model: Path, threads: int = 0, provider: str = "CPUExecutionProvider") -> None:
        check_provider(provider)
        try:
            self._session = ort.InferenceSession(os.fspath(model), sess_options=_session_options(threads),
                                                 providers=[provider])
        except Exception as exc:
            raise BundleError(f"onnxruntime cannot load {model} ({str(exc).splitlines()[0]})",
                              "re-copy inference.onnx from the host") from exc
        names = {i.name for i in self._session.get_inputs()}
        if names != {"images", "delta", "prototypes"}:
            raise BundleError(f"{model} has inputs {sorted(names)}, expected images, delta, prototypes",
                              "re-export the bundle with this edgecl version")

    def run(self, images: np.ndarray, delta: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings, logits = self._session.run(["embeddings", "logits"], {
            "images": np.ascontiguousarray(images, np.float32),
            "delta": np.ascontiguousarray(delta, np.float32),
            "prototypes": np.ascontiguousarray(prototypes, np.float32)})
        return embeddings, logits
