"""B2's torch side, one process per measurement (so `/usr/bin/time -v` sees only it).

--mode full         : every weight trained (SGD, no momentum), SupCon on two views, BN folded, eval mode;
--mode channels_last: the same with the model and the images in channels_last memory format (torch's
                      fastest CPU convolution layout on this machine);
--mode hooks        : the bundle's mask applied by gradient hooks (grad * selected * fresh Bernoulli gate *
                      0.9^overlap), SGD without momentum, so only gated elements move, as on the device.
Same images, augmentation, batch, size and thread count as `edgecl adapt`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as `python benchmarks/b2_device_cost/b2_torch_worker.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks.shared import common
from edgecl.formats.config import load_recipe
from edgecl.formats.images import load_image_folder, two_views
from edgecl.formats.mask import Mask
from edgecl.host.loss import ProjectionHead, supcon_loss
from edgecl.host.model import build_embedding_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("full", "channels_last", "hooks"), required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--recipe", default=str(common.RECIPE))
    ap.add_argument("--mask", default="", help="mask.safetensors of the bundle (hooks mode)")
    ap.add_argument("--steps", type=int, default=19)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--drop-rate", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=1993)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = load_recipe(args.recipe)
    images = load_image_folder(args.data, recipe.input_size, recipe.interpolation)
    model = build_embedding_model(recipe)
    dim = int(model(torch.zeros(1, 3, *recipe.input_size)).shape[1])
    head = ProjectionHead(dim, recipe.proj_dim)
    params = dict(model.named_parameters())
    gate_gen = torch.Generator().manual_seed(args.seed)
    if args.mode == "hooks":
        mask = Mask.load_file(args.mask)
        for name, p in params.items():
            if name not in mask.indices:
                p.requires_grad_(False)  # no element selected: torch skips its weight gradient
                continue
            p.requires_grad_(True)
            selected = torch.zeros(p.numel())
            selected[torch.from_numpy(mask.indices[name].astype(np.int64))] = torch.from_numpy(
                np.power(0.9, mask.overlap[name]).astype(np.float32))
            selected = selected.reshape(p.shape)

            def hook(grad: torch.Tensor, selected: torch.Tensor = selected) -> torch.Tensor:
                gate = torch.rand(grad.shape, generator=gate_gen) >= args.drop_rate
                return grad * selected * gate
            p.register_hook(hook)
    else:
        for p in params.values():
            p.requires_grad_(True)
    memory_format = torch.channels_last if args.mode == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # in place: `params` and the optimizer see the same tensors
    opt = torch.optim.SGD([{"params": [p for p in params.values() if p.requires_grad], "lr": args.lr},
                           {"params": head.parameters(), "lr": 1e-2}], momentum=0.0)
    rng = np.random.default_rng(args.seed)
    model.eval()
    step_s, losses = [], []
    n = len(images.labels)
    perm = rng.permutation(n)
    for step in range(args.steps):
        t0 = time.perf_counter()
        start = (step * args.batch_size) % n
        rows = perm[start:start + args.batch_size]
        views = torch.from_numpy(two_views(images.pixels[rows], rng, recipe.mean, recipe.std, recipe.interpolation))
        views = views.contiguous(memory_format=memory_format)
        y = torch.from_numpy(np.concatenate([images.labels[rows], images.labels[rows]]))
        opt.zero_grad(set_to_none=True)
        loss = supcon_loss(head(model(views)), y, 0.07)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
    print(json.dumps({"mode": args.mode, "steps": args.steps, "step_s": step_s,
                      "step_s_median": float(np.median(step_s)), "final_loss": losses[-1]}))


if __name__ == "__main__":
    main()
