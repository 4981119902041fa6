"""The device's training step as ONE standard-ONNX graph (``train_step.onnx``).

Inputs  images [rows,3,H,W], labels [rows] int64, row_weight [rows] (1 real, 0 padding),
        delta [K], proj_weight [P,D], proj_bias [P]
Outputs loss (SupCon), grad_delta [K], grad_proj_weight [P,D], grad_proj_bias [P]

Plain onnxruntime (no training build) runs it as an InferenceSession. How it is built (the
measured technique of docs/design-notes.md#training-step-graph):
1. the step is a torch function: W = W0 + scatter_add(idx, delta piece) for every masked tensor,
   SupCon on the projected embeddings, then ``torch.autograd.grad`` of the loss wrt the delta and
   the projection head;
2. ``make_fx`` traces it (forward and backward) into one graph of ATen ops;
3. torch's own convolution backward has no ONNX export, so every convolution runs through
   ``_Conv2dFn``, whose backward is written with forward convolutions and matrix products laid
   out for onnxruntime's CPU fast paths: frozen weights stay constant initializers (so its NCHWc
   convolution kernels apply), a depthwise input gradient is a stride-1 depthwise convolution of
   the zero-inserted, padded output gradient with the flipped constant kernel, a pointwise (1x1)
   convolution's gradients are MatMuls, and a trainable bias is added after the convolution;
4. the FX graph is exported by the dynamo ONNX exporter at opset 18, and checked (ai.onnx ops
   only, IR version 10, which onnxruntime 1.19 still loads);
5. in a bundle, every initializer whose bytes are a tensor of ``weights.safetensors`` (the frozen
   weights, the masked tensors' W0) becomes ONNX external data pointing into that file, as in
   ``inference.onnx``: the graph holds only its structure and small derived constants, so a
   version whose weights differ (same names and shapes) has a byte-identical ``train_step.onnx``
   and the bundle holds W0 once (``externalize_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.overrides import TorchFunctionMode

from edgecl.errors import EdgeclError, ExportError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.mask import Mask
from edgecl.host.loss import l2_normalize, supcon_loss

OPSET = 18
IR_VERSION = 10          # onnxruntime 1.19 refuses newer IR versions
ONNX_DOMAINS = ("", "ai.onnx")

if TYPE_CHECKING:
    import onnx

_pair = nn.modules.utils._pair


# --- convolution with an exportable, fast-path backward ---------------------------------------------------


def _is_depthwise(weight: torch.Tensor, groups: int, in_channels: int) -> bool:
    return groups > 1 and groups == in_channels and weight.shape[1] == 1 and weight.shape[0] == groups


def _is_pointwise(weight_shape: Sequence[int], stride: tuple, padding: tuple, dilation: tuple, groups: int) -> bool:
    return (tuple(weight_shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and groups == 1)


# Layouts chosen per layer by measurement (onnxruntime 1.32 CPU, 1 thread, Lite0 shapes, 64 images):
# below this many output pixels a 1x1 convolution is fastest as one GEMM over all images
# (channels-first blocks), above it as a batched MatMul / Conv; a stride-2 depthwise input gradient
# is fastest as ConvTranspose on maps of at least this size and as a conv of the spread gradient
# on smaller ones (ConvTranspose there is up to 8x slower).
_SMALL_MAP_PIXELS = 64
_CONVT_MIN_PIXELS = 256


def _spread(dy: torch.Tensor, stride: tuple, before: tuple, after: tuple) -> tuple[torch.Tensor, tuple[int, int]]:
    """dy with stride-1 zeros between its elements (a strided conv's output spread back over its
    input grid) and ``before``/``after`` zeros at the borders (negative = cropped). Returns the
    tensor and the symmetric part of the border, left to the convolution's own padding."""
    n, c, ho, wo = dy.shape
    sh, sw = stride
    if sh > 1 or sw > 1:
        # Nearest upsampling times a constant checkerboard: a Resize and a Mul are far faster in
        # onnxruntime than a Pad/Concat/DepthToSpace spreading with 1-element strides.
        keep = torch.zeros(sh, sw)
        keep[0, 0] = 1.0
        checker = keep.repeat(ho, wo).to(dy.dtype).reshape(1, 1, ho * sh, wo * sw)
        dy = F.interpolate(dy, size=(ho * sh, wo * sw), mode="nearest") * checker
        # The spreading leaves stride-1 trailing zeros past the last element.
        after = (after[0] - (sh - 1), after[1] - (sw - 1))
    common = tuple(max(min(before[i], after[i]), 0) for i in range(2))
    extra_before = [before[i] - common[i] for i in range(2)]
    extra_after = [after[i] - common[i] for i in range(2)]
    pads = (max(extra_before[1], 0), max(extra_after[1], 0), max(extra_before[0], 0), max(extra_after[0], 0))
    if any(pads):
        dy = F.pad(dy, pads)
    if min(extra_before + extra_after) < 0:
        h, w = dy.shape[2], dy.shape[3]
        dy = dy[:, :, max(-extra_before[0], 0):h - max(-extra_after[0], 0),
                max(-extra_before[1], 0):w - max(-extra_after[1], 0)]
    return dy, common


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [C, N*H*W] (moves whole H*W blocks: cheap)."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, c, -1).transpose(0, 1).reshape(c, -1)


def _images_first(t: torch.Tensor, n: int, hw: tuple[int, int]) -> torch.Tensor:
    """[C, N*H*W] -> [N, C, H, W]."""
    # contiguous(): a copy, not a view (a custom Function's output may then be modified in place).
    return t.reshape(t.shape[0], n, *hw).transpose(0, 1).contiguous()


def conv2d_input_grad(dy: torch.Tensor, weight: torch.Tensor, input_hw: tuple[int, int], stride: tuple,
                      padding: tuple, dilation: tuple, groups: int,
                      flipped: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx of y = conv2d(x, weight) with forward-only ops."""
    n, co, ho, wo = dy.shape
    ci = weight.shape[1] * groups
    if _is_pointwise(weight.shape, stride, padding, dilation, groups):
        w2 = weight.reshape(co, ci)
        if ho * wo < _SMALL_MAP_PIXELS:
            return _images_first(torch.mm(w2.t(), _channels_first(dy)), n, (ho, wo))
        return F.conv2d(dy, w2.t().reshape(ci, co, 1, 1))
    kh, kw = weight.shape[2], weight.shape[3]
    out_pad = tuple(input_hw[i] - ((dy.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] *
                                   ((kh, kw)[i] - 1) + 1) for i in range(2))
    strided = tuple(stride) != (1, 1)
    if _is_depthwise(weight, groups, ci) and not (strided and ho * wo >= _CONVT_MIN_PIXELS):
        # Transposed conv == stride-1 conv of the spread, padded dy with the flipped kernel;
        # onnxruntime's depthwise Conv kernels (NCHWc, constant kernel) beat its ConvTranspose.
        before = tuple(dilation[i] * ((kh, kw)[i] - 1) - padding[i] for i in range(2))
        after = tuple(before[i] + out_pad[i] for i in range(2))
        kernel = flipped if flipped is not None else torch.flip(weight, (2, 3))
        spread, conv_pad = _spread(dy, stride, before, after)
        return F.conv2d(spread, kernel, None, 1, conv_pad, dilation, groups)
    return F.conv_transpose2d(dy, weight, None, stride, padding, out_pad, groups, dilation)


def conv2d_weight_grad(x: torch.Tensor, dy: torch.Tensor, weight_shape: Sequence[int], stride: tuple,
                       padding: tuple, dilation: tuple, groups: int) -> torch.Tensor:
    """dL/dW of y = conv2d(x, W) with forward-only ops (the roles of batch and channels swapped)."""
    n, ci, h, w = x.shape
    co, ci_g, kh, kw = weight_shape
    ho, wo = dy.shape[2], dy.shape[3]
    if _is_pointwise(weight_shape, stride, padding, dilation, groups):
        # dW[co, ci] = sum over images and pixels of dy[co, p] * x[ci, p].
        if ho * wo < _SMALL_MAP_PIXELS:
            xt = x.reshape(n, ci, h * w).transpose(1, 2).reshape(n * h * w, ci)
            return torch.mm(_channels_first(dy), xt).reshape(co, ci, 1, 1)
        per_image = torch.bmm(dy.reshape(n, co, ho * wo), x.reshape(n, ci, h * w).transpose(1, 2))
        return per_image.sum(0).reshape(co, ci, 1, 1)
    if groups == 1:
        # Channels of x as the batch, images as the channels, dy as the kernel; stride and
        # dilation swap roles.
        g = F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), None, dilation, padding, stride)
        return g[:, :, :kh, :kw].transpose(0, 1)
    if groups == ci and ci_g == 1 and co == groups:
        # Depthwise: fold the images into the channels, one group per (image, channel).
        g = F.conv2d(x.reshape(1, n * ci, h, w), dy.reshape(n * co, 1, ho, wo), None, dilation, padding,
                     stride, n * ci)
        return g[:, :, :kh, :kw].reshape(n, co, kh, kw).sum(0).unsqueeze(1)
    # Other grouped convolutions: one ordinary convolution per group (rare; correct, not fast).
    co_g = co // groups
    parts = [conv2d_weight_grad(x[:, i * ci_g:(i + 1) * ci_g], dy[:, i * co_g:(i + 1) * co_g],
                                (co_g, ci_g, kh, kw), stride, padding, dilation, 1) for i in range(groups)]
    return torch.cat(parts, 0)


class _Conv2dFn(torch.autograd.Function):
    """conv2d whose backward make_fx traces into exportable forward ops (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, flipped):  # noqa: ANN001, ANN205
        ctx.conf = (stride, padding, dilation, groups)
        ctx.flipped = flipped
        n, _, h, w = x.shape
        ctx.small_pointwise = (_is_pointwise(weight.shape, stride, padding, dilation, groups)
                               and h * w < _SMALL_MAP_PIXELS)
        if ctx.small_pointwise:
            # Small maps (the late, wide layers): one GEMM over all images beats a per-image Conv.
            x2 = _channels_first(x)
            y2 = torch.mm(weight.reshape(weight.shape[0], -1), x2)
            if bias is not None:
                y2 = y2 + bias.reshape(-1, 1)
            ctx.save_for_backward(x2, weight)
            ctx.hw = (h, w)
            return _images_first(y2, n, (h, w))
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        saved, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        dx = dw = db = None
        if ctx.small_pointwise:
            dy2 = _channels_first(dy)
            w2 = weight.reshape(weight.shape[0], -1)
            if ctx.needs_input_grad[0]:
                dx = _images_first(torch.mm(w2.t(), dy2), dy.shape[0], ctx.hw)
            if ctx.needs_input_grad[1]:
                dw = torch.mm(dy2, saved.t()).reshape(weight.shape)
            if ctx.needs_input_grad[2]:
                db = dy2.sum(1)
            return dx, dw, db, None, None, None, None, None
        x = saved
        if ctx.needs_input_grad[0]:
            dx = conv2d_input_grad(dy, weight, (x.shape[2], x.shape[3]), stride, padding, dilation, groups,
                                   ctx.flipped)
        if ctx.needs_input_grad[1]:
            dw = conv2d_weight_grad(x, dy, weight.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None, None, None, None, None


class _ClampFn(torch.autograd.Function):
    """ReLU / ReLU6 / hardtanh whose backward is grad * (lo < y < hi): torch's decomposition uses
    Where, which runs about 5x slower in onnxruntime than a Cast and a Mul."""

    @staticmethod
    def forward(ctx, x, lo, hi):  # noqa: ANN001, ANN205
        y = torch.relu(x) if (lo, hi) == (0.0, None) else torch.clamp(x, lo, hi)
        ctx.save_for_backward(y)  # the output: the next layer keeps it anyway
        ctx.bounds = (lo, hi)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = y > lo if hi is None else (y > lo) & (y < hi)
        return grad * inside.to(grad.dtype), None, None


def _clamp_bounds(func, args, kwargs) -> tuple[float, float | None] | None:  # noqa: ANN001
    if func is F.relu or func is torch.relu:
        return 0.0, None
    if func is F.relu6:
        return 0.0, 6.0
    if func is F.hardtanh:
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    return None


def _conv_args(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: ANN001, ANN202
    return x, weight, bias, _pair(stride), padding, _pair(dilation), groups


def _numeric_padding(padding: object, weight: torch.Tensor, stride: tuple, dilation: tuple) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        if stride != (1, 1) or any(t % 2 for t in total):
            raise ExportError("a convolution uses asymmetric 'same' padding, which the step graph does not support",
                              "pad explicitly (timm pads with F.pad) or report the model")
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,  # noqa: ANN001, ANN202
               enable_gqa=False):
    """scaled_dot_product_attention written out: torch's fused CPU kernels have a backward that
    neither decomposes nor exports; matmuls and a softmax differentiate into plain ops."""
    if dropout_p:
        raise ExportError("the model uses attention dropout in eval mode", "export the model in eval mode")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scale = scale if scale is not None else 1.0 / float(q.shape[-1]) ** 0.5
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        n, m = q.shape[-2], k.shape[-2]
        causal = torch.ones(n, m, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class _ConvRouter(TorchFunctionMode):
    """Sends every conv2d of the model through ``_Conv2dFn``; ``flipped`` maps id(frozen depthwise
    weight) -> its flipped copy, computed once outside the trace so it is a constant initializer."""

    def __init__(self, flipped: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.flipped = flipped

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        bounds = _clamp_bounds(func, args, kwargs)
        if bounds is not None:
            # In-place variants return a new tensor here; timm uses the return value.
            return _ClampFn.apply(args[0], *bounds) if args[0].requires_grad else func(*args, **kwargs)
        if func is not F.conv2d and func is not torch.conv2d:
            return func(*args, **kwargs)
        x, weight, bias, stride, padding, dilation, groups = _conv_args(*args, **kwargs)
        padding = _numeric_padding(padding, weight, stride, dilation)
        if bias is not None and bias.requires_grad and not weight.requires_grad:
            # A constant weight with a trainable bias: the bias is added after the conv, so the
            # conv's inputs stay constant (onnxruntime's fast path needs a constant weight and bias).
            y = self._conv(x, weight, None, stride, padding, dilation, groups)
            return y + bias.reshape(1, -1, 1, 1)
        return self._conv(x, weight, bias, stride, padding, dilation, groups)

    def _conv(self, x, weight, bias, stride, padding, dilation, groups):  # noqa: ANN001, ANN202
        if x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
            return _Conv2dFn.apply(x, weight, bias, stride, padding, dilation, groups, self.flipped.get(id(weight)))
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,  # noqa: A002, ANN001, ANN202
                          transposed, output_padding, groups, output_mask):
    """aten.convolution_backward for a convolution that escaped ``_ConvRouter`` (safety net)."""
    if transposed or input.dim() != 4:
        raise ExportError("the model has a transposed or non-2-D convolution, which the step graph cannot "
                          "differentiate", "use a model made of 2-D convolutions, linear layers and norms")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    dx = dw = db = None
    if output_mask[0]:
        dx = conv2d_input_grad(grad_output, weight, (input.shape[2], input.shape[3]), stride, padding,
                               dilation, groups)
    if output_mask[1]:
        dw = conv2d_weight_grad(input, grad_output, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        db = grad_output.sum((0, 2, 3))
    return dx, dw, db


# --- the step ----------------------------------------------------------------------------------------------


class _TrainStep:
    """The step as a torch function of the graph inputs (traced once by make_fx)."""

    def __init__(self, model: nn.Module, mask: Mask, temperature: float) -> None:
        self.model = copy.deepcopy(model).eval()  # the caller's model is never touched
        params = dict(self.model.named_parameters())
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in mask.order:
            if name not in params:
                raise ExportError(f"mask tensor {name} is not a parameter of the model",
                                  "export the mask made for this model")
            if tuple(params[name].shape) != tuple(mask.shapes[name]):
                raise ExportError(f"mask tensor {name} has shape {tuple(mask.shapes[name])}, the model's is "
                                  f"{tuple(params[name].shape)}", "export the mask made for this model")
        self.masked = list(mask.order)
        self.counts = mask.counts
        self.base = {n: params[n].detach().reshape(-1).clone() for n in self.masked}
        self.shapes = {n: tuple(params[n].shape) for n in self.masked}
        self.indices = {n: torch.from_numpy(mask.indices[n].astype(np.int64)) for n in self.masked}
        self.temperature = float(temperature)
        masked = set(self.masked)
        self.flipped: dict[int, torch.Tensor] = {}
        for module_name, module in self.model.named_modules():
            name = f"{module_name}.weight" if module_name else "weight"
            if (isinstance(module, nn.Conv2d) and name not in masked
                    and _is_depthwise(module.weight, module.groups, module.in_channels)):
                self.flipped[id(module.weight)] = torch.flip(module.weight.detach(), (2, 3)).contiguous()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor, delta: torch.Tensor,
                 proj_weight: torch.Tensor, proj_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            proj_weight = proj_weight.detach().requires_grad_(True)
            proj_bias = proj_bias.detach().requires_grad_(True)
            # One piece per tensor: the backward of the split is a single Concat of the pieces' gradients.
            pieces = torch.split(delta, self.counts)
            weights = {n: self.base[n].scatter_add(0, self.indices[n], piece).reshape(self.shapes[n])
                       for n, piece in zip(self.masked, pieces, strict=True)}
            with _ConvRouter(self.flipped):
                emb = torch.func.functional_call(self.model, weights, (images,), strict=False)
            z = l2_normalize(F.linear(emb, proj_weight, proj_bias))
            loss = supcon_loss(z, labels, self.temperature, row_weight)
            grads = torch.autograd.grad(loss, [delta, proj_weight, proj_bias])
        return (loss.detach(), *[g.detach() for g in grads])


class _GraphModule(nn.Module):
    """Gives the traced FX graph the graph's input names (the exporter names inputs after forward's)."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, images, labels, row_weight, delta, proj_weight, proj_bias):  # noqa: ANN001, ANN201
        return tuple(self.gm(images, labels, row_weight, delta, proj_weight, proj_bias))


def example_inputs(mask: Mask, proj: nn.Linear, rows: int, input_size: tuple[int, int],
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h, w = input_size
    labels = torch.arange(rows, dtype=torch.int64) % max(rows // 2, 1) % 4
    return (torch.randn(rows, 3, h, w, generator=g), labels, torch.ones(rows),
            torch.zeros(mask.total_selected), proj.weight.detach().clone().float(),
            proj.bias.detach().clone().float())


def _backward_decompositions() -> dict:
    """ATen backward ops as forward ops: the ONNX exporter translates forward ops only."""
    from torch._decomp import core_aten_decompositions

    table = {k: v for k, v in core_aten_decompositions().items() if "backward" in str(k)}
    table[torch.ops.aten.convolution_backward.default] = _convolution_backward
    return table


def trace_train_step(model: nn.Module, mask: Mask, proj: nn.Linear, temperature: float, rows: int,
                     input_size: tuple[int, int]) -> torch.fx.GraphModule:
    """The joint forward+backward FX graph of the step (ATen ops, no convolution_backward left)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    step = _TrainStep(model, mask, temperature)
    table = _backward_decompositions()
    with torch.no_grad():
        gm = make_fx(step, decomposition_table=table, tracing_mode="real")(
            *example_inputs(mask, proj, rows, input_size))
    left = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution_backward.default]
    if left:
        raise ExportError("the traced step still holds convolution_backward", "report this with the recipe")
    gm.meta[WEIGHT_NAMES] = _weight_constants(gm, step)
    return gm


WEIGHT_NAMES = "edgecl_weight_names"   # gm.meta key: traced constant attribute -> parameter name


def _weight_constants(gm: torch.fx.GraphModule, step: _TrainStep) -> dict[str, str]:
    """Which of the trace's constants ARE a parameter's W0 (make_fx keeps the very tensor objects:
    the frozen parameters and each masked tensor's flat W0), by identity: two parameters with
    equal values stay two names, whatever the values."""
    whole = {(t.data_ptr(), t.numel()): n for n, t in step.model.named_parameters()}
    whole.update({(t.data_ptr(), t.numel()): n for n, t in step.base.items()})
    found = {}
    for attr in dir(gm):
        value = getattr(gm, attr, None) if attr.startswith(("_tensor_constant", "_param_constant")) else None
        if isinstance(value, torch.Tensor) and value.is_contiguous():
            name = whole.get((value.data_ptr(), value.numel()))
            if name is not None:
                found[attr] = name
    return found


# --- ONNX ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and deprecation warnings meant for its developers."""
    import io
    import logging

    saved = {n: logging.getLogger(n).level for n in ("torch.onnx", "onnxscript", "torch.export", "torch._export")}
    for n in saved:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _tidy(model) -> None:  # noqa: ANN001 (onnx_ir.Model)
    """Constant folding and dead-node removal only. The exporter's full optimizer adds onnxscript's
    pattern rewrites, which take half the export time and change nothing measurable in
    onnxruntime (it runs its own fusions). Small folds only: a folded transpose of a large frozen
    weight would be stored twice."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir, remove_unused_nodes

    for _ in range(2):
        fold_constants_ir(model, onnx_shape_inference=True, input_size_limit=8192, output_size_limit=8192)
        remove_unused_nodes(model)
    # No DeduplicateInitializersPass: two weights that happen to be equal in one version (zero
    # biases) must stay two initializers, or the graph would change when a later version moves one.
    for step in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.CommonSubexpressionEliminationPass(), common.NameFixPass()):
        step(model)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first line, without terminal colours (the exporter wraps the
    useful message, e.g. "No ONNX function found for aten.x", in generic ones)."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    first = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else ""
    return f"{type(exc).__name__}: {first}"


def build_step_onnx(model: nn.Module, mask: Mask, proj: nn.Linear, temperature: float, rows: int,
                    input_size: tuple[int, int]) -> onnx.ModelProto:
    """The step graph as an in-memory ONNX model (checked: ai.onnx ops only, IR version 10)."""
    gm = trace_train_step(model, mask, proj, temperature, rows, input_size)
    example = example_inputs(mask, proj, rows, input_size)
    try:
        with _quiet():
            program = torch.onnx.export(_GraphModule(gm).eval(), example, dynamo=True, opset_version=OPSET,
                                        input_names=list(mf.STEP_INPUTS), output_names=list(mf.STEP_OUTPUTS),
                                        external_data=False, optimize=False, verify=False)
            if program is None:
                raise RuntimeError("torch.onnx.export returned no program")
            _tidy(program.model)
            proto = program.model_proto
    except Exception as exc:
        raise ExportError(f"the ONNX exporter failed on the training step ({_root_cause(exc)})",
                          "report this with the recipe") from exc
    proto.ir_version = IR_VERSION
    _strip_provenance(proto)
    _name_weights(proto, {f"gm.{attr}": name for attr, name in gm.meta[WEIGHT_NAMES].items()})
    check_step_graph(proto, mask, rows, input_size)
    return proto


def _name_weights(proto: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename the initializers that hold a parameter's W0 to the parameter's name (as in
    inference.onnx and weights.safetensors), so ``externalize_weights`` finds each by name; merge
    equal constants that are not weights."""
    taken = {i.name for i in proto.graph.input} | {o for n in proto.graph.node for o in n.output}
    renames = {i.name: names[i.name] for i in proto.graph.initializer if i.name in names}
    if taken & set(renames.values()) or len(set(renames.values())) != len(renames):
        raise ExportError("a parameter name of the model collides with a name in the step graph",
                          "report this with the recipe")
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    # The constants that are not weights (mask indices, flipped kernels, folded transposes) depend
    # only on the mask and the frozen weights: equal ones are merged, the first name kept.
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    drop = []
    for init in proto.graph.initializer:
        if init.name in names.values() or not init.HasField("raw_data"):
            continue
        key = (init.data_type, tuple(init.dims), init.raw_data)
        if key in first:
            renames[init.name] = first[key]
            drop.append(init.name)
        else:
            first[key] = init.name
    kept = [i for i in proto.graph.initializer if i.name not in set(drop)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for node in proto.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]


def _strip_provenance(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debugging metadata: stack traces with this machine's paths and
    a per-process trace counter (``<eval_with_key>.20``). Without it the same model exports to the
    same bytes, so a release whose weights alone changed sends no new step graph; it is also 80%
    of the graph's structure bytes, and onnxruntime never reads it."""
    for entry in (*proto.graph.node, *proto.graph.value_info, *proto.graph.initializer,
                  *proto.graph.input, *proto.graph.output):
        del entry.metadata_props[:]
        entry.doc_string = ""
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""


def check_step_graph(proto: onnx.ModelProto, mask: Mask, rows: int, input_size: tuple[int, int]) -> None:
    """Raise ExportError unless the graph is one plain onnxruntime can run as the step contract says."""
    domains = {n.domain for n in proto.graph.node} | {o.domain for o in proto.opset_import if o.domain}
    foreign = sorted(d for d in domains if d not in ONNX_DOMAINS)
    if foreign or proto.functions:
        what = f"domain {foreign[0]}" if foreign else f"function {proto.functions[0].name}"
        raise ExportError(f"the training-step graph uses {what}, which plain onnxruntime cannot run",
                          "report this with the recipe")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if tuple(inputs) != mf.STEP_INPUTS or tuple(outputs) != mf.STEP_OUTPUTS:
        raise ExportError(f"the training-step graph has inputs {inputs} and outputs {outputs}",
                          f"expected {list(mf.STEP_INPUTS)} -> {list(mf.STEP_OUTPUTS)}; report this")
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if dims != [rows, 3, *input_size]:
        raise ExportError(f"the training-step graph takes images {dims}", "report this with the recipe")


def externalize_weights(proto: onnx.ModelProto, weights_path: Path) -> int:
    """Point every initializer named after a tensor of ``weights_path`` (a canonical
    weights.safetensors in the graph's own folder) into that file as ONNX external data; returns
    how many. A masked tensor's W0 is stored flat in the graph: the same bytes, another shape.
    Derived constants (flipped depthwise kernels, small folded transposes) stay inside the graph;
    they come from tensors the mask never selects, so they do not change between versions."""
    from onnx import TensorProto

    from edgecl.formats.weights import tensor_offsets

    data = weights_path.read_bytes()
    offsets = tensor_offsets(data)
    moved = 0
    for init in proto.graph.initializer:
        if init.name not in offsets or init.data_type != TensorProto.FLOAT:
            continue
        offset, length = offsets[init.name]
        if not init.HasField("raw_data") or init.raw_data != data[offset:offset + length]:
            raise ExportError(f"the step graph's {init.name} is not the weight {weights_path.name} holds",
                              "write the model's own weights beside the graph first (export does)")
        point_to_external(init, weights_path.name, offset, length)
        moved += 1
    return moved


def point_to_external(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``init`` read its bytes from ``location`` (beside the graph) at ``offset``, ``length``:
    ONNX external data. Both graphs of a bundle read the base weights from weights.safetensors so."""
    from onnx import TensorProto

    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def export_train_step(model: nn.Module, mask: Mask, proj: nn.Linear, temperature: float, rows: int,
                      input_size: tuple[int, int], path: Path, weights: Path | None = None) -> None:
    """Write ``train_step.onnx`` (see the module docstring) to ``path`` atomically. With ``weights``
    (the bundle's weights.safetensors, beside ``path``, holding the model's weights), the weights
    are read from that file as external data instead of being copied into the graph."""
    if rows < 2:
        raise ExportError(f"the training step needs at least 2 rows, got {rows}", "use a batch of 2 or more")
    if mask.total_selected == 0:
        raise ExportError("the mask selects no element, so the step has nothing to train",
                          "raise the select rate or exclude fewer tensors")
    proto = build_step_onnx(model, mask, proj, temperature, rows, (int(input_size[0]), int(input_size[1])))
    if weights is not None:
        if Path(weights).parent.resolve() != Path(path).parent.resolve():
            raise ExportError(f"{weights} is not beside {path}", "external data must live in the graph's folder")
        externalize_weights(proto, Path(weights))
    data = proto.SerializeToString()
    try:
        atomic_write_bytes(path, data)
    except EdgeclError as exc:
        raise ExportError(exc.problem, exc.fix) from exc
