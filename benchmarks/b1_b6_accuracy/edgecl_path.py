"""The real edgecl path as a harness learner, one task after another:

  host:   task 1: `edgecl export RECIPE --data TASK/train` (MI-Fisher mask on the task's images);
          task t > 1: `edgecl apply BUNDLE_{t-1} DELTA_{t-1} --data TASK/train` (bake the delta into the
          weights, re-score a fresh mask, overlap counts carried), then `edgecl upgrade BUNDLE_{t-1}
          BUNDLE_t` (the device carries its prototypes, LDA head and exemplars to the new version)
  device: `edgecl adapt BUNDLE_t --data TASK/train` in its own process (onnxruntime, no torch), with
          the device's own rules: exemplars (profile store_images = true), replay at the share given,
          old classes moved by their exemplars' drift, the LDA head carried by the drift map,
          prototypes of a class seen again merged by counts
  device: `edgecl delta BUNDLE_t -o DELTA_t --values V` (V: the rules' delta_values, fp32 unless an arm says)
  eval:   embeddings from BUNDLE_t's inference graph with DELTA_t, in onnxruntime; the heads scored are
          the device's own (its committed prototypes and LDA head), see ``heads()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.b1_b6_accuracy.harness import AdaptInput, AdaptLog, OwnHeads, StreamRules
from benchmarks.b1_b6_accuracy.torch_methods import TrainConfig
from benchmarks.shared import common
from edgecl.datasets import FASHION_CLASSES
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.config import Recipe
from edgecl.formats.mask import Mask


class EdgeclLearner:
    name = "edgecl"

    def __init__(self, recipe: Recipe, cfg: TrainConfig, rules: StreamRules, threads: int, work: Path,
                 recipe_path: Path = common.RECIPE, gate: bool = True) -> None:
        if cfg.loss != "supcon" or not cfg.rescore:
            raise SystemExit("the edgecl path trains SupCon with a mask re-scored per task; this arm asks for "
                             f"loss={cfg.loss}, rescore={cfg.rescore}")
        if rules.replay and not rules.replay_seen:
            raise SystemExit("the device replays every class its memory holds, a task's own classes included "
                             "(their earlier cameras): give the edgecl arm rules={'replay_seen': True}")
        self.recipe, self.cfg, self.rules, self.threads, self.gate = recipe, cfg, rules, threads, gate
        self.work = work
        common.clean(self.work)
        self.work.mkdir(parents=True)
        self.profile = self.work / "device.toml"
        self.profile.write_text(f'name = "bench"\nthreads = {threads}\nbatch_size = {cfg.batch_size}\n'
                                f"store_images = {'true' if rules.exemplars else 'false'}\n"
                                "exemplar_budget_mb = 32\n")
        self.recipe_path = recipe_path
        self.bundle: Path | None = None
        self.delta: np.ndarray | None = None
        self.delta_path: Path | None = None
        self.records: list[dict[str, Any]] = []
        self._runner = None
        self._frozen = None

    def adapt(self, inp: AdaptInput) -> AdaptLog:
        t0 = time.perf_counter()
        cfg, task = self.cfg, inp.index
        data = inp.task.folder / "train"
        bundle = self.work / f"bundle-{task + 1}"
        if self.bundle is None:
            host_out = self._edgecl("export", str(self.recipe_path), "--data", str(data), "-o", str(bundle),
                                    "--device", str(self.profile), "--lr", str(cfg.lr), "--epochs", str(cfg.epochs),
                                    "--seed", str(cfg.seed), "--select-rate", str(cfg.select_rate),
                                    "--drop-rate", str(cfg.drop_rate), "--overwrite", "--quiet")
        else:
            host_out = self._edgecl("apply", str(self.bundle), str(self.delta_path), "-o", str(bundle),
                                    "--data", str(data), "--overwrite", "--quiet")
            self._edgecl("upgrade", str(self.bundle), str(bundle))
        host_s = time.perf_counter() - t0
        cmd = [*common.edgecl_cmd(), "adapt", str(bundle), "--data", str(data), "--device", str(self.profile),
               "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--lr-head", str(cfg.lr_head),
               "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed + task),
               "--max-step-fraction", str(cfg.max_step_fraction), *([] if self.gate else ["--no-gate"]),
               *(["--replay", "--replay-share", str(self.rules.replay_share)] if self.rules.replay else ["--no-replay"]),
               *(["--drift-compensation"] if self.rules.old_update in ("shift", "sdc") else ["--no-drift-compensation"]),
               *(["--max-old-drop", str(self.rules.max_old_drop)] if self.rules.max_old_drop is not None else []),
               "--json", "--quiet"]
        timed = common.run_timed(cmd, env=common.thread_env(self.threads))
        report = json.loads(timed.stdout[timed.stdout.index("{"):])
        delta_path = self.work / f"delta-{task + 1}.safetensors"
        self._edgecl("delta", str(bundle), "-o", str(delta_path), "--device-id", "bench",
                     "--values", self.rules.delta_values)
        mask = Mask.load_file(bundle / mf.MASK)
        self.bundle, self.delta_path, self._runner = bundle, delta_path, None
        # What the device runs after this task: the bundle's graph with the delta it sent home.
        self.delta = delta_format.load_file(delta_path).to_dense(mask.total_selected)
        steps = self._steps(bundle)
        by_epoch: dict[int, list[float]] = {}
        for s in steps:
            by_epoch.setdefault(s["epoch"], []).append(s["loss"])
        self.records.append({"task": task + 1, "host_s": round(host_s, 1), "host_output": host_out.strip()[-300:],
                             "adapt_process_s": round(timed.wall_s, 1), "adapt_peak_rss_mib": timed.max_rss_mib,
                             "report": report, "delta_bytes": delta_path.stat().st_size,
                             "selected": mask.total_selected, "total_params": mask.total_params})
        return AdaptLog(steps=report["steps"], seconds=time.perf_counter() - t0,
                        losses=[float(np.mean(v)) for _, v in sorted(by_epoch.items())],
                        changed_fraction=[s["changed_fraction"] for s in steps])

    def heads(self) -> OwnHeads | None:
        """The device's committed prototypes and LDA head, keyed by Fashion-MNIST class id."""
        if self.bundle is None:
            return None
        from edgecl.device.heads import LdaHead
        from edgecl.device.state import load_current, open_bundle
        state = load_current(open_bundle(self.bundle))
        ids = {c: FASHION_CLASSES.index(c) for c in state.prototypes.classes}
        protos = {ids[c]: state.prototypes.means[i].astype(np.float64) for i, c in enumerate(state.prototypes.classes)}
        lda = None
        if state.lda_path is not None:
            lda = LdaHead.load_file(state.lda_path)
            lda.means = {FASHION_CLASSES.index(c): m for c, m in lda.means.items()}
        return OwnHeads(protos, lda)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.bundle is None:
            # Before any task: the pretrained backbone, which a zero-delta bundle reproduces (export checks
            # parity); the torch model is that network and costs no export.
            if self._frozen is None:
                from benchmarks.b1_b6_accuracy.torch_methods import TorchLearner
                self._frozen = TorchLearner(self.recipe, "frozen", self.cfg, self.threads)
            return self._frozen.embed(pixels)
        from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
        from edgecl.device.state import open_bundle
        b = open_bundle(self.bundle)
        if self._runner is None:
            self._runner = create_runner(b, resolve_profile(self.profile))
        return embed_and_score(self._runner, b, pixels, self.delta)[0]

    def device_summary(self) -> list[dict[str, Any]]:
        return self.records

    def _edgecl(self, *args: str) -> str:
        proc = subprocess.run([*common.edgecl_cmd(), *args], capture_output=True, text=True,
                              env={**os.environ, **common.thread_env(self.threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"edgecl {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc.stdout

    def _steps(self, bundle: Path) -> list[dict[str, Any]]:
        head = json.loads((bundle / "state" / "HEAD.json").read_text())
        log = bundle / "state" / head["current"] / "steps.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
