"""B2's onnxruntime-training row: the device step of bundle format 1, rebuilt for a side-by-side run.

onnxruntime-training left the project (its last release is 1.19.2); this script keeps its step
measurable next to the new runtime. It never runs in the project's .venv (onnxruntime-training and
plain onnxruntime both own the ``onnxruntime`` module), only in a throwaway virtualenv:

    python -m venv /tmp/ortt
    /tmp/ortt/bin/pip install onnxruntime-training-cpu==1.19.2 onnx==1.17.0 numpy pillow safetensors tqdm

Three sub-commands, the same path format 1 took (git show ae9ad1d:edgecl/host/export.py,
ae9ad1d:edgecl/device/ort.py):

- ``export`` (.venv, torch): the bundle's model and mask as the old forward graph: W = W0 +
  scatter(edgecl_delta) by torch parametrizations, SupCon on the projected embeddings, TorchScript
  exporter at opset 17, initializers not graph inputs; head initialised from head.safetensors;
- ``artifacts`` (/tmp/ortt): ``onnxruntime.training.artifacts.generate_artifacts`` on that graph
  (trainable: edgecl_delta, proj.weight, proj.bias; no optimizer graph, as before);
- ``run`` (/tmp/ortt, no torch in the process): the old device loop, per step two augmented views ->
  ``Module.train_step`` -> gradients read back -> the current numpy drop gate and sparse SGD
  (edgecl/device/update.py) -> parameters written back. Prints one JSON line.

``import onnxruntime.training`` imports torch (its optim subpackage); the artifacts builder and the
C++ training classes do not need it, so ``onnxruntime.training`` is replaced by a bare package
object before importing them (the old device reached the same classes through _pybind_state).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np

# Run as `python benchmarks/b2_device_cost/b2_ortt_worker.py`, also by the onnxruntime-training venv, where edgecl
# is not installed: the checkout's root on the path, for `edgecl.*` and `benchmarks.*`.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DELTA, PROJ_W, PROJ_B = "edgecl_delta", "proj.weight", "proj.bias"  # the format-1 trainable names
OPSET, IR_MAX = 17, 10


# -- export (torch, the project's .venv) -----------------------------------------------------------
def export_forward(bundle: Path, out: Path) -> None:
    import warnings

    import onnx
    import torch
    from safetensors.numpy import load_file
    from torch import nn

    from benchmarks.shared.sparse import attach_sparse_delta
    from edgecl.formats.config import load_recipe
    from edgecl.formats.mask import Mask
    from edgecl.host.loss import l2_normalize, supcon_loss
    from edgecl.host.model import build_embedding_model

    manifest = json.loads((bundle / "manifest.json").read_text())
    recipe_file = REPO / "models" / f"{manifest['model_name']}.toml"
    recipe = load_recipe(recipe_file)
    recipe.input_size = list(manifest["input_size"])
    model = build_embedding_model(recipe).eval()
    mask = Mask.load_file(bundle / "mask.safetensors")
    head_init = load_file(str(bundle / "head.safetensors"))
    source = attach_sparse_delta(model, mask)

    class TrainGraph(nn.Module):  # format 1's _TrainGraph: images, labels -> loss
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model
            self.proj = nn.Linear(manifest["embedding_dim"], manifest["proj_dim"])
            with torch.no_grad():
                self.proj.weight.copy_(torch.from_numpy(head_init[PROJ_W]))
                self.proj.bias.copy_(torch.from_numpy(head_init[PROJ_B]))
            self.edgecl_delta = nn.Parameter(torch.zeros(mask.total_selected))
            self._source = [source]

        def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self._source[0].current = self.edgecl_delta
            z = l2_normalize(self.proj(self.backbone(images)))
            return supcon_loss(z, labels, manifest["loss_temperature"])

    h, w = recipe.input_size
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # keep_initializers_as_inputs stops the exporter merging equal-valued initializers (format 1).
        torch.onnx.export(TrainGraph().eval(), (torch.randn(4, 3, h, w), torch.tensor([0, 1, 0, 1])), str(out),
                          dynamo=False, opset_version=OPSET, input_names=["images", "labels"],
                          output_names=["loss"], dynamic_axes={"images": {0: "batch"}, "labels": {0: "batch"}},
                          keep_initializers_as_inputs=True, do_constant_folding=False, export_params=True)
    proto = onnx.load(str(out))
    inits = {i.name for i in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.ir_version = min(proto.ir_version, IR_MAX)
    missing = {DELTA, PROJ_W, PROJ_B} - inits
    if missing:
        raise SystemExit(f"the forward graph lacks {sorted(missing)}")
    onnx.save(proto, str(out))
    print(json.dumps({"forward": str(out), "bytes": out.stat().st_size, "selected": mask.total_selected}))


# -- onnxruntime-training (the throwaway venv) -------------------------------------------------------
def _training_modules() -> tuple:
    import onnxruntime

    if "onnxruntime.training" not in sys.modules:
        stub = types.ModuleType("onnxruntime.training")  # skip training/__init__.py, which imports torch
        stub.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = stub
    from onnxruntime.capi import _pybind_state as c
    if not (hasattr(c, "Module") and hasattr(c, "load_checkpoint")):
        raise SystemExit(f"onnxruntime {onnxruntime.__version__} here has no training API: run this in /tmp/ortt")
    return onnxruntime, c


def make_artifacts(forward: Path, out: Path) -> None:
    import onnx

    _training_modules()
    from onnxruntime.training import artifacts

    model = onnx.load(str(forward))
    trainable = [DELTA, PROJ_W, PROJ_B]
    frozen = [i.name for i in model.graph.initializer
              if i.name not in trainable and i.data_type == onnx.TensorProto.FLOAT]
    out.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen, loss=None, optimizer=None,
                                 artifact_directory=str(out))
    print(json.dumps({name: (out / name).stat().st_size for name in ("training_model.onnx", "eval_model.onnx",
                                                                       "checkpoint")}))


def run(args: argparse.Namespace) -> None:
    onnxruntime, c = _training_modules()
    from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector

    from edgecl.device.update import cap_gate, draw_gate, overlap_scale, sgd_step, sparse_sgd_step
    from edgecl.formats.images import load_image_folder, two_views
    from edgecl.formats.mask import Mask

    assert "torch" not in sys.modules, "the device-side process must not load torch"
    bundle, art = Path(args.bundle), Path(args.artifacts)
    m = json.loads((bundle / "manifest.json").read_text())
    mask = Mask.load_file(bundle / "mask.safetensors")
    images = load_image_folder(args.data, m["input_size"], m["interpolation"])
    options = c.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    device = c.OrtDevice(c.OrtDevice.cpu(), c.OrtDevice.default_memory(), 0)
    state = c.load_checkpoint(str(art / "checkpoint"))
    module = c.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"), device, options)

    def get(name: str, grad: bool = False) -> np.ndarray:
        p = state.get_parameter(name)
        return np.array((p.grad if grad else p.data).numpy(), dtype=np.float32, copy=True)

    def put(name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value, np.float32)  # alive for the call: the OrtValue borrows it
        state.get_parameter(name).copy_from(state, c.OrtValue.ortvalue_from_numpy(array, device))

    data_seq, gate_seq = np.random.SeedSequence(m["seed"]).spawn(2)
    data_rng, gate_rng = np.random.Generator(np.random.PCG64(data_seq)), np.random.Generator(np.random.PCG64(gate_seq))
    scale = overlap_scale(mask.overlap_vector(), m["overlap_decay"])
    max_gated = int(math.floor(args.max_step_fraction * m["total_params"]))
    delta, pw, pb = get(DELTA), get(PROJ_W), get(PROJ_B)
    perm = data_rng.permutation(len(images.labels))
    step_s, losses = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = perm[(step * args.batch_size) % len(perm):][:args.batch_size]
        views = two_views(images.pixels[rows], data_rng, m["mean"], m["std"], m["interpolation"])
        labels = np.concatenate([images.labels[rows], images.labels[rows]]).astype(np.int64)
        fetches = OrtValueVector()
        module.train_step([np.ascontiguousarray(views, np.float32), labels], fetches)
        loss = float(fetches[0].numpy())
        gate = cap_gate(draw_gate(gate_rng, delta.size, m["drop_rate"]), max_gated, gate_rng)
        delta = sparse_sgd_step(delta, get(DELTA, grad=True), gate, scale, m["lr_backbone"], m["weight_decay"]).delta
        pw = sgd_step(pw, get(PROJ_W, grad=True), m["lr_head"])
        pb = sgd_step(pb, get(PROJ_B, grad=True), m["lr_head"])
        for name, value in ((DELTA, delta), (PROJ_W, pw), (PROJ_B, pb)):
            put(name, value)
        module.lazy_reset_grad()
        losses.append(loss)
        step_s.append(time.perf_counter() - t0)
    print(json.dumps({"mode": "onnxruntime-training", "onnxruntime": onnxruntime.__version__, "steps": args.steps,
                      "step_s": step_s, "step_s_median": float(np.median(step_s)), "first_loss": losses[0],
                      "final_loss": losses[-1], "torch_loaded": "torch" in sys.modules}))


def main() -> None:
    ap = argparse.ArgumentParser(description="B2: the format-1 onnxruntime-training step, in its own venv")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="(.venv) the bundle's model + mask as the format-1 forward graph")
    e.add_argument("--bundle", required=True)
    e.add_argument("--out", required=True)
    a = sub.add_parser("artifacts", help="(/tmp/ortt) onnxruntime-training artifacts from the forward graph")
    a.add_argument("--forward", required=True)
    a.add_argument("--out", required=True)
    r = sub.add_parser("run", help="(/tmp/ortt) the timed device loop")
    r.add_argument("--bundle", required=True)
    r.add_argument("--artifacts", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--max-step-fraction", type=float, default=0.005)  # edgecl adapt's default
    args = ap.parse_args()
    if args.cmd == "export":
        export_forward(Path(args.bundle), Path(args.out))
    elif args.cmd == "artifacts":
        make_artifacts(Path(args.forward), Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
