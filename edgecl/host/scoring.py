"""MI-Fisher scores: the empirical Fisher information of the MI loss per weight element.

docs/method.md#step-1: a projection head g on the pooled embedding, two augmented views per image,
supervised contrastive loss (temperature 0.07); the score of a weight element is the mean over
batches of (dL/dw)^2, over one pass of the calibration data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgecl.formats.images import two_views
from edgecl.host.loss import ProjectionHead, supcon_loss
from edgecl.progress import progress_bar


def batch_order(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded shuffle cut into batches; a last batch of one image is merged (SupCon needs pairs)."""
    order = rng.permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


def mi_fisher_scores(model: nn.Module, head: ProjectionHead, pixels: np.ndarray, labels: np.ndarray,
                     mean: list[float], std: list[float], batch_size: int = 32, temperature: float = 0.07,
                     seed: int = 1993, interpolation: str = "bilinear",
                     progress: bool = True) -> dict[str, np.ndarray]:
    """Mean squared gradient of the MI loss for every parameter of ``model`` (float32, same shapes)."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    rng = np.random.default_rng(seed)
    batches = batch_order(len(pixels), batch_size, rng)
    # A bar on a terminal only: piped and logged output stays free of it.
    bar = progress_bar(len(batches), "MI-Fisher scores", enabled=progress, unit="batch")
    model.eval()  # BN is folded; eval keeps dropout / drop-path off, as on the device
    for idx in batches:
        views = torch.from_numpy(two_views(pixels[idx], rng, mean, std, interpolation))
        y = torch.from_numpy(np.concatenate([labels[idx], labels[idx]]))
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        loss = supcon_loss(head(model(views)), y, temperature)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach() ** 2
        bar.update(1)
    bar.close()
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return {n: (s / max(len(batches), 1)).numpy().astype(np.float32) for n, s in sums.items()}
