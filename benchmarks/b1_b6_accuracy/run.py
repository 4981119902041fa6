"""Run a named B1 / B6 experiment (experiments.py) and write its result file.

  .venv/bin/python benchmarks/b1_b6_accuracy/run.py --list
  .venv/bin/python benchmarks/b1_b6_accuracy/run.py ablation_b1 --threads 1
  .venv/bin/python benchmarks/b1_b6_accuracy/run.py defaults_b6 --arms frozen,"mist 10 epochs" --seeds 7   # a part; rerun without to finish

Each (arm, lr, seed) run is written to benchmarks/out/NAME/runs/ as it finishes, with the settings it
ran under; a rerun skips the runs already there with the same settings (so a stopped experiment
continues, and parts may run in separate processes). Then every run present is summarised into
benchmarks/out/NAME.json and NAME.png: per arm and head family, the lr and head parameter chosen on
validation, test mean +- std over seeds; the headline compares each arm's best head with frozen's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _pin_threads() -> None:
    """--threads N also holds numpy's BLAS to N threads: it must be set before numpy is imported."""
    n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
    if "--threads" in sys.argv[:-1]:
        n = sys.argv[sys.argv.index("--threads") + 1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n or "1")


_pin_threads()
# Run as `python benchmarks/b1_b6_accuracy/run.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.b1_b6_accuracy import experiments, streams  # noqa: E402
from benchmarks.b1_b6_accuracy.harness import (  # noqa: E402
    FAMILIES,
    LDA_SHRINKAGE,
    RANPAC_RIDGE,
    StreamRules,
    run_stream,
    split_data,
    summarize_arms,
)
from benchmarks.shared import common  # noqa: E402

CRITERION = "mean_val"


def arm_settings(exp: experiments.Experiment, arm: experiments.Arm) -> tuple[dict[str, Any], StreamRules]:
    from benchmarks.b1_b6_accuracy.torch_methods import TrainConfig
    train = dataclasses.asdict(TrainConfig()) | exp.train | arm.train
    rules = StreamRules(**(exp.rules | arm.rules))
    return train, rules


EDGECL_GATE = "last epoch, else the best earlier one not worse"  # since 2026-12-02 (before: last epoch or nothing)
# --max-old-drop judges a 95% upper bound on the old classes' drop since 2026-12-06 08:40 (before: the
# observed drop on their held-out exemplars): guarded runs made under the earlier rule are not reused
OLD_GUARD = "95% upper bound on the drop"


def run_key(exp: experiments.Experiment, arm: experiments.Arm, lr: float | None, seed: int) -> dict[str, Any]:
    train, rules = arm_settings(exp, arm)
    return {"bench": exp.bench, "per_class": list(exp.per_class), "size": exp.size, "method": arm.method,
            "lr": lr, "seed": seed, "train": train | {"lr": lr or 0.0, "seed": seed},
            # max_old_drop enters the key only when set, so runs made before it existed are still reused
            # (delta_values likewise when not fp32, what every earlier run used)
            "rules": {k: v for k, v in dataclasses.asdict(rules).items() if k not in ("max_old_drop", "delta_values")}
            | {"heads": list(rules.heads)}
            | ({"max_old_drop": rules.max_old_drop, "old_guard": OLD_GUARD} if rules.max_old_drop is not None else {})
            | ({"delta_values": rules.delta_values} if rules.delta_values != "fp32" else {}),
            "head_grid": {"lda": list(LDA_SHRINKAGE), "ranpac": list(RANPAC_RIDGE)},
            # the device's do-no-harm gate rule: runs made under an earlier rule are not reused
            **({"gate": EDGECL_GATE} if arm.method == "edgecl" else {})}


def run_path(name: str, arm: str, lr: float | None, seed: int) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in arm).strip("-")
    return common.OUT / name / "runs" / f"{slug}__lr{lr or 0:g}__s{seed}.json"


def load_runs(name: str) -> list[dict[str, Any]]:
    folder = common.OUT / name / "runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def make_learner(arm: experiments.Arm, train: dict[str, Any], rules: StreamRules, recipe: Any, threads: int,
                 work: Path) -> Any:
    from benchmarks.b1_b6_accuracy.torch_methods import TorchLearner, TrainConfig
    cfg = TrainConfig(**train)
    if arm.method in ("edgecl", "edgecl-nogate"):
        from benchmarks.b1_b6_accuracy.edgecl_path import EdgeclLearner
        from benchmarks.shared.bundles import recipe_for_size
        return EdgeclLearner(recipe, cfg, rules, threads, work, recipe_for_size(recipe.input_size[0]),
                             gate=arm.method == "edgecl")
    return TorchLearner(recipe, arm.method, cfg, threads=threads)


def chosen_lr(runs: list[dict[str, Any]], arm: str) -> float | None:
    summary = summarize_arms(runs, [arm], CRITERION).get(arm)
    if summary is None:
        return None
    return summary["families"][summary["best"]]["lr"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--list", action="store_true", help="list the experiments")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="", help="only these arms (comma list of labels)")
    ap.add_argument("--seeds", default="", help="only these seeds")
    ap.add_argument("--summarize", action="store_true", help="only summarise the runs already written")
    args = ap.parse_args()
    if args.list or not args.name:
        for name, exp in experiments.EXPERIMENTS.items():
            print(f"{name:14s} {exp.bench} {exp.per_class} seeds {list(exp.seeds)}: "
                  f"{', '.join(a.label for a in exp.arms)}")
        return
    exp = experiments.get(args.name)
    t0 = time.perf_counter()
    from edgecl.formats.config import load_recipe
    recipe = load_recipe(common.RECIPE)
    recipe.input_size = [exp.size, exp.size]
    build = streams.b1_stream if exp.bench == "b1" else streams.b6_stream
    stream = build(recipe.input_size, *exp.per_class)
    print(f"{args.name}: {exp.bench} stream, {sum(len(t.train.labels) for t in stream.tasks)} train images "
          f"in {len(stream.tasks)} tasks, loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    arms = [a for a in exp.arms if not args.arms or a.label in args.arms.split(",")]
    seeds = [s for s in exp.seeds if not args.seeds or str(s) in args.seeds.split(",")]
    if not args.summarize:
        for arm in arms:
            lrs: list[float | None] = list(arm.lrs) if arm.lrs else [None]
            if arm.lr_from:
                lr = chosen_lr(load_runs(exp.folder or args.name), arm.lr_from)
                if lr is None:
                    print(f"== {arm.label}: {arm.lr_from} has no runs yet; skipped", flush=True)
                    continue
                lrs = [lr]
            for lr in lrs:
                # frozen does not train: the seed changes nothing (the image subsample is fixed), one run
                for seed in (exp.seeds[:1] if arm.method == "frozen" else seeds):
                    key = run_key(exp, arm, lr, seed)
                    path = run_path(exp.folder or args.name, arm.label, lr, seed)
                    if path.is_file() and json.loads(path.read_text()).get("key") == key:
                        continue
                    print(f"== {arm.label} lr={lr} seed={seed}", flush=True)
                    train, rules = arm_settings(exp, arm)
                    train = train | {"lr": lr or 0.0, "seed": seed}
                    learner = make_learner(arm, train, rules, recipe, args.threads,
                                           common.OUT / (exp.folder or args.name) / "work" / path.stem)
                    record = run_stream(learner, stream, rules, arm.label)
                    record |= {"arm": arm.label, "method": arm.method, "lr": lr, "seed": seed, "key": key,
                               "threads": args.threads, "date_utc": common.machine()["date_utc"]}
                    if hasattr(learner, "device_summary"):
                        record["device"] = learner.device_summary()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record, default=common._json_default) + "\n")
    finalize(args.name, exp, stream)
    print(f"total {time.perf_counter() - t0:.0f}s")


def finalize(name: str, exp: experiments.Experiment, stream: streams.Stream) -> None:
    labels = [a.label for a in exp.arms]
    runs = [r for r in load_runs(exp.folder or name) if r["arm"] in labels
            and r["key"] == run_key(exp, next(a for a in exp.arms if a.label == r["arm"]), r["lr"], r["seed"])]
    summary = summarize_arms(runs, labels, CRITERION)
    group = "camera" if exp.bench == "b6" else "task"
    print(f"\n{name}: test accuracy %, mean +- std over seeds; lr and head parameter chosen on val {CRITERION}")
    rows = []
    for arm, s in summary.items():
        for fam in FAMILIES:
            if fam not in s["families"]:
                continue
            c = s["families"][fam]
            rows.append([arm + (" *" if fam == s["best"] else ""), _g(c["lr"]), c["head"],
                         _pm(c, "last_test"), _pm(c, "mean_test"), _pm(c, "forgetting_test"),
                         _pm(c, "first_group_test"), _pm(c, "last_group_test"), f"{c['mean_val']:.1f}",
                         f"{c['last_val']:.1f}", f"{c['digits_before']:.1f} -> {c['digits_after']:.1f}",
                         len(c["seeds"])])
    table = common.print_table(["arm (* best head on val)", "lr", "head", "last", "mean A_t", "forgetting",
                                f"first {group}", f"last {group}", "val mean", "val last", "digits", "seeds"], rows)
    headline = _headline(summary)
    head_table = common.print_table(["arm [best head on val]", "val mean", "x frozen", "val last", "x frozen",
                                     "test last", "x frozen", "forgetting", f"first {group}", f"last {group}",
                                     "digits after"], headline) if headline else ""
    matrix = _matrix(summary, stream) if exp.bench == "b6" else ""
    result = {"name": name, "command": f"python benchmarks/b1_b6_accuracy/run.py {name}", "experiment": dataclasses.asdict(exp),
              "data": split_data(stream), "machine": common.machine(), "criterion": CRITERION,
              "summary": summary, "table": table, "headline": head_table, "matrix": matrix, "runs": runs}
    common.write_json(f"{name}.json", result)
    plot(summary, common.OUT / f"{name}.png", name, group)
    print(f"wrote {common.OUT / (name + '.json')} and .png ({len(runs)} runs)")


def _headline(summary: dict[str, Any]) -> list[list[Any]]:
    """Each arm's best head (chosen on val) against frozen's best head."""
    if "frozen" not in summary:
        return []
    fz = summary["frozen"]["families"][summary["frozen"]["best"]]
    rows = []
    for arm, s in summary.items():
        c = s["families"][s["best"]]
        rows.append([f"{arm} [{c['head']}]", f"{c['mean_val']:.1f}", f"{c['mean_val'] - fz['mean_val']:+.1f}",
                     f"{c['last_val']:.1f}", f"{c['last_val'] - fz['last_val']:+.1f}", _pm(c, "last_test"),
                     f"{c['last_test'] - fz['last_test']:+.1f}", _pm(c, "forgetting_test"),
                     _pm(c, "first_group_test"), _pm(c, "last_group_test"), f"{c['digits_after']:.1f}"])
    return rows


def _matrix(summary: dict[str, Any], stream: streams.Stream) -> str:
    """B6: per-camera test accuracy after each step, best head of every arm."""
    names = [t.name.split("-", 2)[2] for t in stream.tasks]
    rows = []
    for arm, s in summary.items():
        c = s["families"][s["best"]]
        for t, accs in enumerate(c["acc_test"]):
            rows.append([f"{arm} [{c['head']}]" if t == 0 else "", f"after {names[t]}",
                         *[f"{a:.1f}" if j <= t else f"({a:.1f})" for j, a in enumerate(accs)]])
    print("\nper camera, test %, after each step ((x): a camera not seen yet)")
    return common.print_table(["arm [best head]", "step", *names], rows)


def _pm(c: dict[str, Any], key: str) -> str:
    return f"{c[key]:.1f} +- {c[key + '_std']:.1f}"


def _g(v: float | None) -> str:
    return "-" if not v else f"{v:g}"


def plot(summary: dict[str, Any], path: Path, title: str, group: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, s in summary.items():
        c = s["families"][s["best"]]
        ax1.plot(range(1, len(c["A_test"]) + 1), c["A_test"], marker="o", label=f"{arm} [{c['head']}]")
    ax1.set_xlabel(group)
    ax1.set_ylabel("A_t, test (%)")
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=6)
    arms = list(summary)
    x = np.arange(len(arms))
    best = [summary[a]["families"][summary[a]["best"]] for a in arms]
    ax2.bar(x - 0.2, [c["last_test"] for c in best], 0.4, yerr=[c["last_test_std"] for c in best], label="last")
    ax2.bar(x + 0.2, [c["forgetting_test"] for c in best], 0.4, label="forgetting")
    ax2.set_xticks(x, arms, rotation=60, ha="right", fontsize=6)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
