"""B2 probe: seconds per training step of ``train_step.onnx`` in plain onnxruntime vs torch full fine-tuning.

One process, alternated rounds (onnxruntime block, torch block, ...), medians of per-step process
CPU seconds and wall seconds. Same model (BN-folded EfficientNet-Lite0 with its real weights), same
rows (2 views x batch), same input size, same SupCon loss; each side does one SGD step per step
(onnxruntime: the graph's gradients applied in numpy to the delta and the head; torch: backward +
optimizer.step on every weight and the head). The mask is a ``--select-rate`` mask drawn from seeded
random scores (the speed depends on how many elements each tensor keeps, which the policy fixes,
not on which ones). Prints and writes one JSON object.

    .venv/bin/python benchmarks/b2_device_cost/b2_step_probe.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as `python benchmarks/b2_device_cost/b2_step_probe.py`: the checkout's root, for its recipe and `edgecl.*`.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "models" / "efficientnet_lite0.toml"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64, help="2 x batch")
    ap.add_argument("--select-rate", type=float, default=0.05)
    ap.add_argument("--policy", choices=("no-depthwise", "all"), default="no-depthwise")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per round and side (after one warm-up)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "b2_step_probe.json"))
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    from edgecl.formats.config import load_recipe
    from edgecl.host.loss import l2_normalize, supcon_loss
    from edgecl.host.masking import depthwise_weight_names, select_mask
    from edgecl.host.model import build_embedding_model
    from edgecl.host.stepgraph import export_train_step

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    recipe.input_size = [args.size, args.size]
    model = build_embedding_model(recipe)
    rng = np.random.default_rng(0)
    scores = {n: rng.random(p.shape).astype(np.float32) for n, p in model.named_parameters()}
    exclude = depthwise_weight_names(model) if args.policy == "no-depthwise" else set()
    mask = select_mask(scores, args.select_rate, exclude=exclude)
    dim = int(model(torch.zeros(1, 3, args.size, args.size)).shape[1])
    torch.manual_seed(0)
    proj = torch.nn.Linear(dim, recipe.proj_dim)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_step.onnx"
        t0 = time.perf_counter()
        export_train_step(model, mask, proj, 0.07, args.rows, (args.size, args.size), path)
        export_s = time.perf_counter() - t0
        graph = onnx.load(str(path))
        graph_info = {"bytes": path.stat().st_size, "nodes": len(graph.graph.node), "export_s": round(export_s, 1)}
        del graph
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.enable_mem_pattern = False  # peak memory about halves, no speed cost (PORTABLE)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    batch = args.rows // 2
    pixels = rng.standard_normal((args.rows, 3, args.size, args.size)).astype(np.float32)
    labels = np.tile(np.arange(batch) % 10, 2).astype(np.int64)
    lr_delta, lr_head = 1e-3, 1e-2
    feeds = {"images": pixels, "labels": labels, "row_weight": np.ones(args.rows, np.float32),
             "delta": np.zeros(mask.total_selected, np.float32),
             "proj_weight": proj.weight.detach().numpy().copy(), "proj_bias": proj.bias.detach().numpy().copy()}

    def ort_step() -> float:
        loss, g_delta, g_w, g_b = sess.run(None, feeds)
        feeds["delta"] -= lr_delta * g_delta
        feeds["proj_weight"] -= lr_head * g_w
        feeds["proj_bias"] -= lr_head * g_b
        return float(loss)

    full = build_embedding_model(recipe)
    for p in full.parameters():
        p.requires_grad_(True)
    head = torch.nn.Linear(dim, recipe.proj_dim)
    head.load_state_dict(proj.state_dict())
    opt = torch.optim.SGD([{"params": list(full.parameters()), "lr": lr_delta},
                           {"params": head.parameters(), "lr": lr_head}], momentum=0.0)
    x_t, y_t = torch.from_numpy(pixels), torch.from_numpy(labels)

    def torch_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = supcon_loss(l2_normalize(head(full(x_t))), y_t, 0.07)
        loss.backward()
        opt.step()
        return loss.item()

    times: dict[str, dict[str, list[float]]] = {k: {"cpu_s": [], "wall_s": []} for k in ("onnxruntime", "torch")}
    losses = {"onnxruntime": ort_step(), "torch": torch_step()}  # warm-up (first-run allocations)
    for _ in range(args.rounds):
        for name, step in (("onnxruntime", ort_step), ("torch", torch_step)):
            for _ in range(args.steps):
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                times[name]["cpu_s"].append(time.process_time() - c0)
                times[name]["wall_s"].append(time.perf_counter() - w0)
    result = {
        "recipe": recipe.name, "size": args.size, "rows": args.rows, "threads": args.threads,
        "policy": args.policy, "selected": mask.total_selected, "selected_fraction": round(mask.selected_fraction, 4),
        "graph": graph_info, "first_loss": losses,
        "onnxruntime": ort.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "median_cpu_s": {k: round(statistics.median(v["cpu_s"]), 4) for k, v in times.items()},
        "median_wall_s": {k: round(statistics.median(v["wall_s"]), 4) for k, v in times.items()},
        "min_cpu_s": {k: round(min(v["cpu_s"]), 4) for k, v in times.items()},
        "steps": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))


if __name__ == "__main__":
    main()
