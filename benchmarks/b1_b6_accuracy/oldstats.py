"""Where B1's first task is lost on the edgecl path: the old classes' statistics or the backbone.

Runs the edgecl path at the shipped defaults (as ``defaults_b1``'s "edgecl defaults" arm, one seed)
and after each task scores the first task's test images four ways under the backbone the device kept:
its own committed statistics (means carried by exemplar drift and the drift map, LDA scatter carried
through the map), the same with its class means replaced by means recomputed exactly from every
training image seen so far under that backbone, the same with the scatter recomputed instead, and
both recomputed (what a device that kept every image could do), and the device's scatter with each
old class's mean taken from its stored exemplars (20, herding) embedded under the kept backbone (what
the device could do instead of carrying the means; the task's classes from all their images).

  .venv/bin/python benchmarks/b1_b6_accuracy/oldstats.py --seed 1993 --tasks 4 --threads 1
  .venv/bin/python benchmarks/b1_b6_accuracy/oldstats.py --seed 1993 --rescore   # score the bundles already made

Prints a table and writes benchmarks/out/oldstats_b1.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.b1_b6_accuracy import experiments, run, streams  # noqa: E402
from benchmarks.b1_b6_accuracy.harness import AdaptInput  # noqa: E402
from benchmarks.shared import common  # noqa: E402
from edgecl.datasets import FASHION_CLASSES  # noqa: E402
from edgecl.device.heads import LdaHead  # noqa: E402
from edgecl.formats import delta as delta_format  # noqa: E402
from edgecl.formats import manifest as mf  # noqa: E402
from edgecl.formats.config import load_recipe  # noqa: E402
from edgecl.formats.exemplars import ExemplarMemory  # noqa: E402
from edgecl.formats.mask import Mask  # noqa: E402

SHRINKAGE = (0.3, 0.6)


def lda_accuracy(cov_head: LdaHead, means: np.ndarray, ids: np.ndarray, emb: np.ndarray, labels: np.ndarray,
                 shrinkage: float) -> float:
    head = dataclasses.replace(cov_head, shrinkage=shrinkage)
    return float(100 * np.mean(ids[head.logits(emb, means).argmax(axis=1)] == labels))


def score_state(learner: Any, stream: streams.Stream, t: int) -> dict[str, float]:
    """The first task's test accuracy under the learner's committed state after task t (0-based)."""
    from edgecl.device.state import load_current, open_bundle
    own = learner.heads()
    assert own is not None and own.lda is not None
    ids = np.asarray(sorted(own.prototypes))
    device_means = np.stack([own.lda.means.get(c, own.prototypes[c]) for c in ids]).astype(np.float64)
    exact = LdaHead(own.lda.dim)
    sums: dict[int, list[np.ndarray]] = {}
    for seen in stream.tasks[: t + 1]:   # per task, as the device adds them (one group per class and task)
        emb = learner.embed(seen.train.pixels)
        exact.add(emb, seen.train.labels)
        for c in seen.classes:
            sums.setdefault(c, []).append(emb[seen.train.labels == c])
    exact_means = np.stack([np.concatenate(sums[c]).mean(axis=0) for c in ids]).astype(np.float64)
    state = load_current(open_bundle(learner.bundle))
    memory = ExemplarMemory.load_file(state.exemplars_path) if state.exemplars_path else None
    task_classes = set(stream.tasks[t].classes)
    exemplar_means = exact_means.copy()
    for i, c in enumerate(ids):
        name = FASHION_CLASSES[c]
        if c not in task_classes and memory is not None and name in memory.classes:
            exemplar_means[i] = learner.embed(memory.of_class(name)).mean(axis=0)
    first = stream.tasks[0].test
    emb = learner.embed(first.pixels)
    row: dict[str, float] = {"task": t + 1}
    for s in SHRINKAGE:
        row[f"device s{s}"] = lda_accuracy(own.lda, device_means, ids, emb, first.labels, s)
        row[f"exact means s{s}"] = lda_accuracy(own.lda, exact_means, ids, emb, first.labels, s)
        row[f"exact scatter s{s}"] = lda_accuracy(exact, device_means, ids, emb, first.labels, s)
        row[f"both exact s{s}"] = lda_accuracy(exact, exact_means, ids, emb, first.labels, s)
        row[f"exemplar means s{s}"] = lda_accuracy(own.lda, exemplar_means, ids, emb, first.labels, s)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rescore", action="store_true", help="score the bundles a previous run left, no adapting")
    args = ap.parse_args()
    exp = experiments.get("defaults_b1")
    arm = next(a for a in exp.arms if a.label == "edgecl defaults")
    train, rules = run.arm_settings(exp, arm)
    train |= {"lr": arm.lrs[0], "seed": args.seed}
    recipe = load_recipe(common.RECIPE)
    recipe.input_size = [exp.size, exp.size]
    stream = streams.b1_stream(recipe.input_size, *exp.per_class)
    work = common.OUT / "oldstats_b1" / f"s{args.seed}"
    learner = run.make_learner(arm, train, rules, recipe, args.threads, work.with_name(work.name + "-rescore")
                               if args.rescore else work)
    rows = []
    for t, task in enumerate(stream.tasks[: args.tasks]):
        if args.rescore:
            bundle = work / f"bundle-{t + 1}"
            if not bundle.is_dir():
                break
            mask = Mask.load_file(bundle / mf.MASK)
            learner.bundle, learner.delta_path, learner._runner = bundle, work / f"delta-{t + 1}.safetensors", None
            learner.delta = delta_format.load_file(learner.delta_path).to_dense(mask.total_selected)
        else:
            learner.adapt(AdaptInput(t, task, task.train.pixels, task.train.labels, {}))
        rows.append(score_state(learner, stream, t))
        print(json.dumps(rows[-1]), flush=True)
    headers = list(rows[0])
    common.print_table(headers, [[r[h] if h == "task" else f"{r[h]:.1f}" for h in headers] for r in rows])
    common.write_json("oldstats_b1.json", {"seed": args.seed, "note": __doc__.split("\n\n")[0], "rows": rows,
                                           "device": [] if args.rescore else learner.device_summary()})


if __name__ == "__main__":
    main()
