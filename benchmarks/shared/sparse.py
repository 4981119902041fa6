"""The sparse reparameterisation: W = W0 + scatter_add(mask indices, delta[slice]).

The torch reference of the weights the device runs (docs/design-notes.md#sparse-weights): one
vector ``delta`` (K values) and, for each masked weight, a parametrization that adds its slice of
the delta at the mask's flat positions. The exported graphs do the same scatter themselves
(edgecl/host/stepgraph.py); this torch version is their reference, for the step-graph parity test
(tests/test_stepgraph.py) and B2's onnxruntime-training row (b2_device_cost/b2_ortt_worker.py), so it
lives with the benchmarks, not in the product. The delta the parametrizations read is whatever
``DeltaSource.current`` holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgecl.formats.mask import Mask


class DeltaSource:
    """Shared by all parametrizations; deliberately not an nn.Module (no duplicate parameters)."""

    def __init__(self, size: int) -> None:
        self.current: torch.Tensor = torch.zeros(size)


class SparseAdd(nn.Module):
    def __init__(self, source: DeltaSource, indices: torch.Tensor, offset: int, count: int) -> None:
        super().__init__()
        self._source = [source]  # a list hides it from nn.Module registration
        self.register_buffer("indices", indices.to(torch.int64), persistent=False)
        self.offset = offset
        self.count = count

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        delta = self._source[0].current[self.offset:self.offset + self.count]
        indices: torch.Tensor = self.indices  # type: ignore[assignment]  # a registered buffer
        return w0.reshape(-1).scatter_add(0, indices, delta).reshape(w0.shape)


def attach_sparse_delta(model: nn.Module, mask: Mask) -> DeltaSource:
    """Parametrize every masked tensor of ``model`` (in place) and return the shared delta source."""
    source = DeltaSource(mask.total_selected)
    for name, offset, count in zip(mask.order, mask.offsets, mask.counts, strict=False):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        indices = torch.from_numpy(mask.indices[name].astype("int64"))
        parametrize.register_parametrization(module, attr, SparseAdd(source, indices, offset, count), unsafe=True)
    return source
