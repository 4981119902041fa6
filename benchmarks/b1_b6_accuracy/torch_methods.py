"""The torch learners: frozen backbone, full fine-tuning, and MIST in torch (the reference).

They use the host's model building (BN folded), SupCon loss, MI-Fisher scores and mask selection, and
the device's numpy update rule (drop gate, per-step cap, overlap scale, gated SGD) and overlap rule
(edgecl.formats.overlap), so the reference and the edgecl path run the same method; only the runtime
differs (torch here, onnxruntime on the device).

Loss (``TrainConfig.loss``): ``supcon`` is the method's (docs/method.md#step-1: two views, projection
head, temperature 0.07). ``supcon+proto`` adds a term aligned with the head: cross-entropy of the
cosine similarities between each view's embedding f(x) and the head's class prototypes (fixed during
the task; a task class new to the head starts from its mean before adapting), temperature
``proto_temperature``, weight ``proto_weight``. It pulls a class's images towards the prototype the
head scores them against, and pushes them from the other classes' (old ones included).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.b1_b6_accuracy.harness import AdaptInput, AdaptLog, OwnHeads
from edgecl.device.update import cap_gate, draw_gate, overlap_scale, sparse_sgd_step
from edgecl.formats.config import Recipe
from edgecl.formats.images import normalize, two_views
from edgecl.formats.mask import Mask
from edgecl.formats.overlap import OverlapHistory
from edgecl.host.loss import ProjectionHead, l2_normalize, supcon_loss
from edgecl.host.masking import depthwise_weight_names, select_mask
from edgecl.host.model import build_embedding_model
from edgecl.host.scoring import batch_order, mi_fisher_scores

LOSSES = ("supcon", "supcon+proto")


@dataclass
class TrainConfig:
    lr: float = 1e-2                 # backbone lr (the delta for MIST, every weight for full FT)
    lr_head: float = 1e-2            # projection head lr (docs/method.md#step-3: head lr 0.01)
    epochs: int = 2                  # training epochs per task (MIST's scoring pass is extra)
    batch_size: int = 32             # images per step, two views each
    temperature: float = 0.07        # SupCon tau
    loss: str = "supcon"             # supcon | supcon+proto (module docstring)
    proto_weight: float = 1.0
    proto_temperature: float = 0.1
    momentum: float = 0.0            # full FT only; MIST is truly sparse (no momentum drift)
    weight_decay: float = 0.0        # full FT: on every weight; MIST: only inside the gate
    select_rate: float = 0.05        # MIST mask: share of all parameters (paper: top 5%)
    drop_rate: float = 0.9           # MIST gate: per-step probability a selected gradient is dropped
    max_step_fraction: float = 0.005  # the device's cap: at most this share of ALL weights per step (0 = none)
    overlap_decay: float = 0.9       # MIST: gradient scale 0.9 ** overlap (docs/method.md#overlap)
    small_tensors: str = "full"      # MIST mask: 1-D tensors fully trainable ("full") or ranked
    mask_policy: str = "no-depthwise"  # the export default: depthwise conv weights never selected; or "all"
    rescore: bool = True             # MIST: a fresh MI-Fisher mask per task (edgecl apply --data); False: task 1's
    seed: int = 1993


class TorchLearner:
    """A backbone that adapts per task and embeds images; ``method`` in frozen | full_ft | mist."""

    def __init__(self, recipe: Recipe, method: str, cfg: TrainConfig, threads: int = 1) -> None:
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss {cfg.loss!r} not in {LOSSES}")
        torch.set_num_threads(threads)
        self.name = method
        self.recipe, self.method, self.cfg = recipe, method, cfg
        self.model: nn.Module = build_embedding_model(recipe)
        self.dim = int(self.model(torch.zeros(1, 3, *recipe.input_size)).shape[1])
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.history = OverlapHistory()       # the device's overlap rule: +1 per round an element changed
        self.mask: Mask | None = None

    @torch.no_grad()
    def embed(self, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
        self.model.eval()
        out = [self.model(torch.from_numpy(normalize(pixels[i:i + batch], self.recipe.mean, self.recipe.std)))
               for i in range(0, len(pixels), batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def heads(self) -> OwnHeads | None:
        return None  # the harness keeps the heads, with the device's rules

    def adapt(self, inp: AdaptInput) -> AdaptLog:
        if self.method == "frozen" or self.cfg.epochs == 0:
            return AdaptLog()
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed + inp.index)
        head = ProjectionHead(self.dim, self.recipe.proj_dim)
        log = (self._mist if self.method == "mist" else self._full)(inp, head)
        log.seconds = time.perf_counter() - t0
        return log

    # -- shared loop pieces -----------------------------------------------------------------------
    def _loss(self, views: torch.Tensor, y: torch.Tensor, head: ProjectionHead,
              targets: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        features = self.model(views)
        loss = supcon_loss(head(features), y, self.cfg.temperature)
        if targets is not None:
            protos, index = targets  # unit prototypes [C, D]; class id -> row
            logits = l2_normalize(features) @ protos.T / self.cfg.proto_temperature
            loss = loss + self.cfg.proto_weight * nn.functional.cross_entropy(logits, index[y])
        return loss

    def _targets(self, inp: AdaptInput) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.loss != "supcon+proto":
            return None
        ids = sorted(inp.targets)
        protos = l2_normalize(torch.from_numpy(np.stack([inp.targets[c] for c in ids]).astype(np.float32)))
        index = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        index[torch.tensor(ids)] = torch.arange(len(ids))
        return protos, index

    def _batches(self, pixels: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        for idx in batch_order(len(pixels), self.cfg.batch_size, rng):
            views = torch.from_numpy(two_views(pixels[idx], rng, self.recipe.mean, self.recipe.std,
                                               self.recipe.interpolation))
            yield views, torch.from_numpy(np.concatenate([labels[idx], labels[idx]]))

    def _full(self, inp: AdaptInput, head: ProjectionHead) -> AdaptLog:
        cfg = self.cfg
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD([{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                               {"params": head.parameters(), "lr": cfg.lr_head, "weight_decay": 0.0}],
                              momentum=cfg.momentum)
        rng = np.random.default_rng([cfg.seed, inp.index])
        targets = self._targets(inp)
        log = AdaptLog()
        self.model.eval()  # BN is folded; eval keeps dropout / drop-path off, as on the device
        for _ in range(cfg.epochs):
            losses = []
            for views, y in self._batches(inp.pixels, inp.labels, rng):
                opt.zero_grad(set_to_none=True)
                loss = self._loss(views, y, head, targets)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                log.steps += 1
            log.losses.append(float(np.mean(losses)))
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        return log

    def _select(self, inp: AdaptInput, head: ProjectionHead) -> Mask:
        """Steps 1-2 (host): MI-Fisher scores on the adaptation data, per-tensor top-k mask, overlap counts."""
        cfg = self.cfg
        if self.mask is not None and not cfg.rescore:
            return self.history.with_counts(self.mask)
        scores = mi_fisher_scores(self.model, head, inp.pixels, inp.labels, self.recipe.mean, self.recipe.std,
                                  batch_size=cfg.batch_size, temperature=cfg.temperature, seed=cfg.seed + inp.index,
                                  interpolation=self.recipe.interpolation, progress=False)
        exclude = depthwise_weight_names(self.model) if cfg.mask_policy == "no-depthwise" else set()
        self.mask = select_mask(scores, cfg.select_rate, None, exclude=exclude, small_tensors=cfg.small_tensors)
        return self.history.with_counts(self.mask)

    def _mist(self, inp: AdaptInput, head: ProjectionHead) -> AdaptLog:
        cfg = self.cfg
        mask = self._select(inp, head)
        params = dict(self.model.named_parameters())
        base = {n: params[n].detach().clone().reshape(-1) for n in mask.order}
        index = {n: torch.from_numpy(mask.indices[n].astype(np.int64)) for n in mask.order}
        slices = mask.slices()
        scale = overlap_scale(mask.overlap_vector(), cfg.overlap_decay)
        max_gated = int(math.floor(cfg.max_step_fraction * self.total_params)) if cfg.max_step_fraction > 0 else -1
        delta = np.zeros(mask.total_selected, np.float32)
        for n in mask.order:
            params[n].requires_grad_(True)
        head_opt = torch.optim.SGD(head.parameters(), lr=cfg.lr_head)
        rng = np.random.default_rng([cfg.seed, inp.index])
        gate_rng = np.random.default_rng([cfg.seed, inp.index, 1])
        targets = self._targets(inp)
        log = AdaptLog()
        self.model.eval()
        # Step 3 (device, here in torch): the gradient of delta is the dense gradient at the mask's
        # positions (W = W0 + scatter(delta)); the numpy rule moves only gated elements, no momentum.
        for _ in range(cfg.epochs):
            losses = []
            for views, y in self._batches(inp.pixels, inp.labels, rng):
                self.model.zero_grad(set_to_none=True)
                head_opt.zero_grad(set_to_none=True)
                loss = self._loss(views, y, head, targets)
                loss.backward()
                grad = np.concatenate([params[n].grad.reshape(-1)[index[n]].numpy() for n in mask.order])
                gate = cap_gate(draw_gate(gate_rng, delta.size, cfg.drop_rate), max_gated, gate_rng)
                step = sparse_sgd_step(delta, grad, gate, scale, cfg.lr, cfg.weight_decay)
                delta = step.delta
                with torch.no_grad():
                    for n in mask.order:
                        flat = params[n].data.reshape(-1)
                        flat[index[n]] = base[n][index[n]] + torch.from_numpy(delta[slices[n]])
                head_opt.step()
                losses.append(loss.item())
                log.changed_fraction.append(step.changed / self.total_params)
                log.steps += 1
            log.losses.append(float(np.mean(losses)))
        for n in mask.order:
            params[n].requires_grad_(False)
            params[n].grad = None
        self.history = self.history.record_round(mask, delta)  # elements this round changed count once more
        return log
