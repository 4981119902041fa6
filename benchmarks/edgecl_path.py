"""The real edgecl path of B1, one task after another:

  host:   task 1: `edgecl export RECIPE --data task-1/train` (MI-Fisher mask on task 1's images);
          task t > 1: `edgecl apply BUNDLE_{t-1} DELTA_{t-1} --data task-t/train` (bake the delta into
          the weights, re-score a fresh mask on task t's images, overlap counts carried)
  device: `edgecl adapt BUNDLE_t --data task-t/train` in its own process (onnxruntime, no torch)
  device: `edgecl delta BUNDLE_t -o DELTA_t`
  eval:   embeddings from BUNDLE_t's inference graph + DELTA_t, in onnxruntime (the device's runtime)

Paper protocol (keep_old=False): old classes' prototypes are kept by this harness, never
recomputed (SimpleCIL), like the torch methods; the device's drift compensation and exemplars are
switched off so the edgecl path runs the same method as the torch reference.

Issue 6 (keep_old=True): the device keeps exemplars (profile store_images = true), replays them and
moves old prototypes by their drift; between versions `edgecl upgrade BUNDLE_{t-1} BUNDLE_t` carries
its memory to the new bundle. The prototypes scored are then the device's own (its committed state).
"""

from __future__ import annotations

import json
import os
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
from edgecl.formats.mask import Mask


class EdgeclLearner:
    def __init__(self, recipe: Recipe, cfg: TrainConfig, threads: int = 2, task_dirs: list[Path] | None = None,
                 work: Path | None = None, recipe_path: Path = common.RECIPE, keep_old: bool = False,
                 replay: bool = True, replay_share: float = 0.0) -> None:

        self.recipe, self.cfg, self.threads = recipe, cfg, threads
        self.task_dirs = task_dirs or []
        size = recipe.input_size[0]
        self.keep_old, self.replay, self.replay_share = keep_old, replay, replay_share
        self.work = work or common.OUT / f"b1-edgecl{'-keep' if keep_old else ''}-{size}px-lr{cfg.lr:g}-s{cfg.seed}"
        common.clean(self.work)
        self.work.mkdir(parents=True)
        self.profile = self.work / "device.toml"
        # A device profile with the benchmark's thread count; exemplars only for issue 6.
        self.profile.write_text(f'name = "bench"\nthreads = {threads}\nbatch_size = {cfg.batch_size}\n'
                                f"store_images = {'true' if keep_old else 'false'}\nexemplar_budget_mb = 32\n")
        self.bundle: Path | None = None
        self.delta: np.ndarray | None = None
        self.delta_path: Path | None = None
        self.recipe_path = recipe_path
        self.records: list[dict[str, Any]] = []
        self._runner = None

    # -- one task ---------------------------------------------------------------------------------
    def adapt(self, pixels: np.ndarray, labels: np.ndarray, task: int) -> AdaptLog:
        t0 = time.perf_counter()
        cfg = self.cfg
        data = self.task_dirs[task] / "train"
        bundle = self.work / f"bundle-{task + 1}"
        t_host = time.perf_counter()
        if self.bundle is None:
            # Host, first task: MI-Fisher mask on this task's images, bundle v1.
            host_out = self._edgecl("export", str(self.recipe_path), "--data", str(data), "-o", str(bundle),
                                    "--lr", str(cfg.lr), "--epochs", str(cfg.epochs), "--seed", str(cfg.seed),
                                    "--select-rate", str(cfg.select_rate), "--drop-rate", str(cfg.drop_rate),
                                    "--overwrite")
        else:
            # Host, later tasks: bake the previous delta into the weights and re-score a fresh mask on
            # this task's images (overlap counts carried), i.e. the next bundle version.
            host_out = self._edgecl("apply", str(self.bundle), str(self.delta_path), "-o", str(bundle),
                                    "--data", str(data), "--overwrite")
            if self.keep_old:  # the device moves to the new version with its exemplars
                self._edgecl("upgrade", str(self.bundle), str(bundle))
        host_s = time.perf_counter() - t_host

        # The device: its own process, onnxruntime only.
        cmd = [*common.edgecl_cmd(), "adapt", str(bundle), "--data", str(data), "--device", str(self.profile),
               "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--lr-head", str(cfg.lr_head),
               "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed + task),
               *(["--replay" if self.replay else "--no-replay", "--replay-share", str(self.replay_share)]
                 if self.keep_old else ["--no-drift-compensation", "--no-exemplars"]), "--json", "--quiet"]
        timed = common.run_timed(cmd, env=common.thread_env(self.threads))
        report = json.loads(timed.stdout[timed.stdout.index("{"):])
        delta_path = self.work / f"delta-{task + 1}.safetensors"
        self._edgecl("delta", str(bundle), "-o", str(delta_path), "--device-id", "bench")

        mask = Mask.load_file(bundle / mf.MASK)
        self.bundle, self.delta_path, self._runner = bundle, delta_path, None
        # What the device runs after this task: the bundle's graph with the delta it sent home.
        self.delta = delta_format.load_file(delta_path).to_dense(mask.total_selected)

        steps = [json.loads(line) for line in
                 (self._state_dir(bundle) / "steps.jsonl").read_text().splitlines() if line.strip()]
        losses_by_epoch: dict[int, list[float]] = {}
        for s in steps:
            losses_by_epoch.setdefault(s["epoch"], []).append(s["loss"])
        log = AdaptLog(steps=report["steps"], seconds=time.perf_counter() - t0,
                       losses=[float(np.mean(v)) for _, v in sorted(losses_by_epoch.items())],
                       changed_fraction=[s["changed_fraction"] for s in steps])
        self.records.append({"task": task + 1, "host_step": "export" if task == 0 else "apply --data",
                             "host_s": host_s, "host_output": host_out.strip()[-400:],
                             "adapt_process_s": timed.wall_s,
                             "adapt_peak_rss_mib": timed.max_rss_mib, "step_s_median": report["step_seconds_median"],
                             "changed_fraction_mean": report["changed_fraction_mean"],
                             "changed_fraction_max": report["changed_fraction_max"],
                             "replayed": report.get("replayed", 0), "from_exemplars": report.get("from_exemplars"),
                             "delta_bytes": delta_path.stat().st_size, "selected": mask.total_selected,
                             "total_params": mask.total_params})
        return log

    def prototypes(self) -> dict[int, np.ndarray] | None:
        """The device's own prototypes (issue 6 runs), by Fashion-MNIST class id; None = the harness keeps them."""
        if not self.keep_old or self.bundle is None:
            return None
        from edgecl.device.state import load_current, open_bundle
        protos = load_current(open_bundle(self.bundle)).prototypes
        return {common.FASHION_CLASSES.index(c): protos.means[i].astype(np.float32)
                for i, c in enumerate(protos.classes)}

    def lda_head(self) -> tuple[Any, dict[int, np.ndarray]] | None:
        """The device's LDA head (statistics and its own class means, by class id), if it has one."""
        if not self.keep_old or self.bundle is None:
            return None
        from edgecl.device.heads import LdaHead
        from edgecl.device.state import load_current, open_bundle
        state = load_current(open_bundle(self.bundle))
        if state.lda_path is None:
            return None
        head = LdaHead.load_file(state.lda_path)
        return head, {common.FASHION_CLASSES.index(c): m for c, m in head.means.items()}

    def _edgecl(self, *args: str) -> str:
        proc = subprocess.run([*common.edgecl_cmd(), *args], capture_output=True, text=True,
                              env={**os.environ, **common.thread_env(self.threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"edgecl {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc.stdout

    def _state_dir(self, bundle: Path) -> Path:
        head = json.loads((bundle / "state" / "HEAD.json").read_text())
        return bundle / "state" / head["current"]

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
