"""The real edgecl path of B1, one task after another:

  host:   export_bundle(task t's images, weights = base patched by every earlier delta, overlap counts)
  device: `edgecl adapt BUNDLE --data task-t/train` in its own process (onnxruntime, no torch)
  device: the delta file (`edgecl delta` when the command exists, else edgecl.formats.delta)
  host:   apply = W0 + delta at the mask's positions -> the next task's base weights
  eval:   embeddings from the bundle's inference graph + the device's delta, in onnxruntime

Old classes' prototypes are kept by this harness, never recomputed (SimpleCIL), like the torch
methods; the device's drift compensation and exemplars are switched off so the edgecl path runs the
same method as the torch reference (issue 6 measures them separately).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from torch_methods import AdaptLog, TrainConfig

from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.config import Recipe
from edgecl.formats.mask import Mask, overlap_to_bytes


def cli_commands() -> set[str]:
    """Commands the installed `edgecl` offers (the other helpers' commands land over time)."""
    from edgecl.cli.main import app
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return names | {g.name for g in app.registered_groups if g.name}


class EdgeclLearner:
    def __init__(self, recipe: Recipe, cfg: TrainConfig, threads: int = 2, task_dirs: list[Path] | None = None,
                 work: Path | None = None) -> None:
        from edgecl.host.model import build_embedding_model

        self.recipe, self.cfg, self.threads = recipe, cfg, threads
        self.task_dirs = task_dirs or []
        size = recipe.input_size[0]
        self.work = work or common.OUT / f"b1-edgecl-{size}px-lr{cfg.lr:g}-s{cfg.seed}"
        common.clean(self.work)
        self.work.mkdir(parents=True)
        self.profile = self.work / "device.toml"
        # A device profile with the benchmark's thread count; exemplars off (the paper protocol).
        self.profile.write_text(f'name = "bench"\nthreads = {threads}\nbatch_size = {cfg.batch_size}\n'
                                "store_images = false\n")
        self.param_names = [n for n, _ in build_embedding_model(recipe).named_parameters()]
        self.weights: dict[str, np.ndarray] | None = None   # None = the recipe's pretrained weights
        self.overlap: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.bundle: Path | None = None
        self.delta: np.ndarray | None = None
        self.commands = cli_commands()
        self.records: list[dict[str, Any]] = []
        self._runner = None

    # -- one task ---------------------------------------------------------------------------------
    def adapt(self, pixels: np.ndarray, labels: np.ndarray, task: int) -> AdaptLog:
        from edgecl.host.export import ExportOptions, export_bundle

        t0 = time.perf_counter()
        cfg = self.cfg
        data = self.task_dirs[task] / "train"
        overlap_path = None
        if self.overlap:
            overlap_path = self.work / f"overlap-{task}.safetensors"
            overlap_path.write_bytes(overlap_to_bytes(self.overlap))
        bundle = self.work / f"bundle-{task + 1}"
        t_export = time.perf_counter()
        export_bundle(self.recipe, data, bundle, options=ExportOptions(
            select_rate=cfg.select_rate, drop_rate=cfg.drop_rate, seed=cfg.seed + task, batch_size=cfg.batch_size,
            temperature=cfg.temperature, lr_backbone=cfg.lr, lr_head=cfg.lr_head, epochs=cfg.epochs,
            overwrite=True, overlap_path=str(overlap_path) if overlap_path else None, progress=False),
            weights_override=self.weights, version=task + 1)
        export_s = time.perf_counter() - t_export

        # The device: its own process, onnxruntime only.
        cmd = [*common.edgecl_cmd(), "adapt", str(bundle), "--data", str(data), "--device", str(self.profile),
               "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--lr-head", str(cfg.lr_head),
               "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed + task),
               "--no-drift-compensation", "--no-exemplars", "--json", "--quiet"]
        timed = common.run_timed(cmd, env=common.thread_env(self.threads))
        report = json.loads(timed.stdout[timed.stdout.index("{"):])

        delta_path = self.work / f"delta-{task + 1}.safetensors"
        self._write_delta(bundle, delta_path)
        mask = Mask.load_file(bundle / mf.MASK)
        delta = delta_format.load_file(delta_path).to_dense(mask.total_selected)
        self.bundle, self.delta, self._runner = bundle, delta, None
        self.weights = self._apply(bundle, mask, delta)
        self.overlap = common.accumulate_overlap(self.overlap, mask)

        steps = [json.loads(line) for line in
                 (self._state_dir(bundle) / "steps.jsonl").read_text().splitlines() if line.strip()]
        losses_by_epoch: dict[int, list[float]] = {}
        for s in steps:
            losses_by_epoch.setdefault(s["epoch"], []).append(s["loss"])
        log = AdaptLog(steps=report["steps"], seconds=time.perf_counter() - t0,
                       losses=[float(np.mean(v)) for _, v in sorted(losses_by_epoch.items())],
                       changed_fraction=[s["changed_fraction"] for s in steps])
        self.records.append({"task": task + 1, "export_s": export_s, "adapt_process_s": timed.wall_s,
                             "adapt_peak_rss_mib": timed.max_rss_mib, "step_s_median": report["step_seconds_median"],
                             "changed_fraction_mean": report["changed_fraction_mean"],
                             "changed_fraction_max": report["changed_fraction_max"],
                             "delta_bytes": delta_path.stat().st_size, "selected": mask.total_selected,
                             "total_params": mask.total_params})
        return log

    def _state_dir(self, bundle: Path) -> Path:
        head = json.loads((bundle / "state" / "HEAD.json").read_text())
        return bundle / "state" / head["current"]

    def _write_delta(self, bundle: Path, path: Path) -> None:
        if "delta" in self.commands:
            subprocess.run([*common.edgecl_cmd(), "delta", str(bundle), "-o", str(path)], check=True,
                           capture_output=True, text=True)
            return
        # `edgecl delta` has not landed: the same file through the format library the device uses.
        from edgecl.device.state import load_current, open_bundle
        b = open_bundle(bundle)
        state = load_current(b)
        meta = state.meta
        m = b.manifest
        delta = delta_format.Delta.from_dense(
            state.delta, bundle_id=m.bundle_id, bundle_version=m.version, base_sha256=m.base_sha256,
            mask_sha256=m.mask_sha256, device_id="bench", steps=int(meta.get("steps_total", 0)),
            samples_seen=int(meta.get("samples_seen", 0)), prototypes=state.prototypes)
        delta_format.save_file(delta, path)

    def _apply(self, bundle: Path, mask: Mask, delta: np.ndarray) -> dict[str, np.ndarray]:
        """W = W0 + delta at the mask's positions: the weights of the next task's export."""
        from edgecl.host.export import read_base_weights
        weights = read_base_weights(bundle / mf.INFERENCE_MODEL, mask, self.param_names)
        weights.update(mask.scatter(delta, weights))
        return weights

    # -- embeddings on the "device" runtime ----------------------------------------------------------
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.bundle is None:
            # Before any task: the pretrained backbone. A zero-delta bundle gives exactly it, but
            # exporting one costs a minute; the torch model is the same network (export checks parity).
            return self._torch_embed(pixels)
        from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
        from edgecl.device.state import open_bundle
        b = open_bundle(self.bundle)
        if self._runner is None:
            self._runner = create_runner(b, resolve_profile(self.profile))
        return embed_and_score(self._runner, b, pixels, self.delta)[0]

    def _torch_embed(self, pixels: np.ndarray) -> np.ndarray:
        from torch_methods import TorchLearner
        if not hasattr(self, "_frozen"):
            self._frozen = TorchLearner(self.recipe, "frozen", self.cfg, self.threads)
        return self._frozen.embed(pixels)

    def device_summary(self) -> list[dict[str, Any]]:
        return self.records
