"""The MI loss: supervised contrastive (InfoNCE / NT-Xent with label positives), docs/method.md#step-1.

Written with ops that export at opset 17 and have gradients in onnxruntime-training 1.19.2:
no F.normalize (Clip), no masked_fill(-inf) (an inf in the graph poisons 0 * inf in the backward).
"""

from __future__ import annotations

import torch
from torch import nn

# Subtracted from the diagonal logits so an anchor never counts itself; finite on purpose.
_SELF_LOGIT_PENALTY = 1e9


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + eps)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """z: [N, P] L2-normalised embeddings of both views; labels: [N]. Mean over anchors.

    Positives of an anchor are all other rows with its label (including its other view); the
    softmax runs over all other rows (diagonal removed).

    ``row_weight`` [N] (1 = real row, 0 = padding): a padding row is never an anchor, never a
    positive and never in a softmax denominator, so a batch padded to a fixed size (the device's
    training graph has a fixed row count) gives the loss and gradients of the real rows alone.
    Padding columns get the same finite penalty as the diagonal (exp underflows to exactly 0).
    """
    n = z.shape[0]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    if row_weight is None:
        logits = (z @ z.t()) / temperature - eye * _SELF_LOGIT_PENALTY
        log_prob = torch.log_softmax(logits, dim=1)
        positives = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(z.dtype) * (1.0 - eye)
        per_anchor = -(positives * log_prob).sum(dim=1) / positives.sum(dim=1).clamp(min=1.0)
        return per_anchor.mean()
    w = row_weight.to(z.dtype)
    off_column = (1.0 - w).unsqueeze(0)                 # [1, N]: 1 for a padding column
    logits = (z @ z.t()) / temperature - (eye + off_column) * _SELF_LOGIT_PENALTY
    log_prob = torch.log_softmax(logits, dim=1)
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(z.dtype) * (1.0 - eye) * w.unsqueeze(0)
    per_anchor = -(positives * log_prob).sum(dim=1) / positives.sum(dim=1).clamp(min=1.0)
    # A tiny floor instead of 1: any batch with a real row divides by its exact weight sum.
    return (per_anchor * w).sum() / w.sum().clamp(min=1e-12)


class ProjectionHead(nn.Module):
    """g: feature_dim -> proj_dim Linear, then L2 normalisation (docs/method.md#step-1)."""

    def __init__(self, feature_dim: int, proj_dim: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, proj_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(features))
