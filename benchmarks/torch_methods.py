"""The torch side of B1: frozen backbone, full fine-tuning, and MIST in torch (the reference).

All three use the lead's host API (model building + BN folding, SupCon loss, MI-Fisher scores,
mask selection) and the device's numpy update rule, so the reference and the edgecl path run the
same method; only the runtime differs (torch here, onnxruntime on the device).

Protocol per task t (BENCHMARKS.md B1): adapt the backbone on task t's training images (two
views per image, SupCon loss, temperature 0.07, BN folded, eval mode), then add task t's class
prototypes computed with the adapted backbone; old prototypes are never recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from common import accumulate_overlap
from torch import nn

from edgecl.device.update import draw_gate, overlap_scale, sparse_sgd_step
from edgecl.formats.config import Recipe
from edgecl.formats.images import normalize, two_views
from edgecl.host.loss import ProjectionHead, supcon_loss
from edgecl.host.masking import select_mask
from edgecl.host.model import build_embedding_model
from edgecl.host.scoring import batch_order, mi_fisher_scores


@dataclass
class TrainConfig:
    lr: float = 1e-3                 # backbone lr (the delta for MIST, every weight for full FT)
    lr_head: float = 1e-2            # projection head lr (METHOD.md: head lr 0.01)
    epochs: int = 5                  # training epochs per task (MIST's scoring pass is extra)
    batch_size: int = 32             # images per step, two views each
    temperature: float = 0.07        # SupCon tau
    momentum: float = 0.0            # full FT only; MIST is truly sparse (no momentum drift)
    weight_decay: float = 0.0        # full FT: on every weight; MIST: only inside the gate
    select_rate: float = 0.05        # MIST mask: share of all parameters (paper: top 5%)
    drop_rate: float = 0.9           # MIST gate: per-step probability a selected gradient is dropped
    overlap_decay: float = 0.9       # MIST: gradient scale 0.9 ** overlap (METHOD.md step 2)
    small_tensors: str = "full"      # MIST mask: 1-D tensors fully trainable ("full") or ranked
    seed: int = 1993


@dataclass
class AdaptLog:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)          # mean loss per epoch
    changed_fraction: list[float] = field(default_factory=list)  # per step, MIST only: changed / all params


class TorchLearner:
    """A backbone that adapts per task and embeds images; ``method`` in frozen | full_ft | mist."""

    def __init__(self, recipe: Recipe, method: str, cfg: TrainConfig, threads: int = 2) -> None:
        torch.set_num_threads(threads)
        self.recipe, self.method, self.cfg = recipe, method, cfg
        self.model: nn.Module = build_embedding_model(recipe)
        self.dim = int(self.model(torch.zeros(1, 3, *recipe.input_size)).shape[1])
        self.total_params = sum(p.numel() for p in self.model.parameters())
        # overlap counts carried between tasks: name -> (flat indices, times selected before)
        self.overlap: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def embed(self, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
        self.model.eval()
        out = [self.model(torch.from_numpy(normalize(pixels[i:i + batch], self.recipe.mean, self.recipe.std)))
               for i in range(0, len(pixels), batch)]
        return torch.cat(out).numpy()

    def adapt(self, pixels: np.ndarray, labels: np.ndarray, task: int) -> AdaptLog:
        if self.method == "frozen":
            return AdaptLog()
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed + task)
        head = ProjectionHead(self.dim, self.recipe.proj_dim)
        log = self._mist(pixels, labels, head, task) if self.method == "mist" else self._full(pixels, labels, head, task)
        log.seconds = time.perf_counter() - t0
        return log

    # -- shared loop pieces -----------------------------------------------------------------------
    def _batches(self, pixels: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        for idx in batch_order(len(pixels), self.cfg.batch_size, rng):
            views = torch.from_numpy(two_views(pixels[idx], rng, self.recipe.mean, self.recipe.std,
                                               self.recipe.interpolation))
            yield views, torch.from_numpy(np.concatenate([labels[idx], labels[idx]]))

    def _full(self, pixels: np.ndarray, labels: np.ndarray, head: ProjectionHead, task: int) -> AdaptLog:
        cfg = self.cfg
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD([{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                               {"params": head.parameters(), "lr": cfg.lr_head, "weight_decay": 0.0}],
                              momentum=cfg.momentum)
        rng = np.random.default_rng([cfg.seed, task])
        log = AdaptLog()
        self.model.eval()  # BN is folded; eval keeps dropout / drop-path off, as on the device
        for _ in range(cfg.epochs):
            losses = []
            for views, y in self._batches(pixels, labels, rng):
                opt.zero_grad(set_to_none=True)
                loss = supcon_loss(head(self.model(views)), y, cfg.temperature)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                log.steps += 1
            log.losses.append(float(np.mean(losses)))
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        return log

    def _mist(self, pixels: np.ndarray, labels: np.ndarray, head: ProjectionHead, task: int) -> AdaptLog:
        cfg = self.cfg
        # Step 1-2 (host): MI-Fisher scores on this task's data, per-tensor top-k mask with overlap.
        scores = mi_fisher_scores(self.model, head, pixels, labels, self.recipe.mean, self.recipe.std,
                                  batch_size=cfg.batch_size, temperature=cfg.temperature, seed=cfg.seed + task,
                                  interpolation=self.recipe.interpolation, progress=False)
        mask = select_mask(scores, cfg.select_rate, self.overlap or None, small_tensors=cfg.small_tensors)
        params = dict(self.model.named_parameters())
        base = {n: params[n].detach().clone().reshape(-1) for n in mask.order}
        index = {n: torch.from_numpy(mask.indices[n].astype(np.int64)) for n in mask.order}
        slices = mask.slices()
        scale = overlap_scale(mask.overlap_vector(), cfg.overlap_decay)
        delta = np.zeros(mask.total_selected, np.float32)
        for n in mask.order:
            params[n].requires_grad_(True)
        head_opt = torch.optim.SGD(head.parameters(), lr=cfg.lr_head)
        rng = np.random.default_rng([cfg.seed, task])
        gate_rng = np.random.default_rng([cfg.seed, task, 1])
        log = AdaptLog()
        self.model.eval()
        # Step 3 (device, here in torch): the gradient of delta is the dense gradient at the mask's
        # positions (W = W0 + scatter(delta)); the numpy rule moves only gated elements, no momentum.
        for _ in range(cfg.epochs):
            losses = []
            for views, y in self._batches(pixels, labels, rng):
                self.model.zero_grad(set_to_none=True)
                head_opt.zero_grad(set_to_none=True)
                loss = supcon_loss(head(self.model(views)), y, cfg.temperature)
                loss.backward()
                grad = np.concatenate([params[n].grad.reshape(-1)[index[n]].numpy() for n in mask.order])
                gate = draw_gate(gate_rng, delta.size, cfg.drop_rate)
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
        # Overlap bookkeeping for the next task: every element selected now counts once more.
        self.overlap = accumulate_overlap(self.overlap, mask)
        return log
