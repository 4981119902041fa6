"""`make test-aarch64`: the device path on an arm64 CPython under qemu-user, compared with x86_64.

Run with the host's .venv Python (it exports the bundle with torch):

    .venv/bin/python scripts/aarch64/check.py [--cache .cache/aarch64]

1. Host, x86_64: export a tiny test_efficientnet bundle (batch 8) from generated images.
2. The same four device commands on two copies of it, with 1 onnxruntime thread each:
   `edgecl adapt B --data D --epochs 1 --no-gate --seed 3 -q --json`, `predict`, `eval`, `delta`
   - x86_64: the .venv (plain onnxruntime from PyPI);
   - aarch64: Debian 12's arm64 python3.11 run by qemu-aarch64-static -L SYSROOT, with PYTHONPATH = the
     unzipped aarch64 wheels (onnxruntime 1.27.0, numpy, Pillow, safetensors, typer, tqdm) + this repo.
   scripts/aarch64/setup.sh builds SYSROOT and the wheel folder; nothing is downloaded here.
3. Compare and print a table; exit 1 on any mismatch, 2 when the set-up is missing.

Tolerances (why):
- Gate draws, selection and SGD are numpy with the same seed on both machines, so everything discrete
  must be EQUAL: per-step gated/changed counts, the delta's support (bitmap), predicted classes and
  top-k order, eval counts.
- Floats come from different onnxruntime builds and CPU kernels (x86 AVX2/FMA vs aarch64 NEON; the
  summation order differs), float32 throughout: per-element results agree to a few float32 ulps, so
  - loss per step: |a - b| <= 1e-4 * |b| (float32 eps is 1.2e-7; the step graph reduces ~10^5 terms);
  - delta, head, prototypes: relative L2 ||a - b|| / ||b|| <= 1e-4. The delta is lr x the sum of a few
    gated gradients: its error is the gradient's (docs/design-notes.md#aarch64 measured 1.2e-6 relative L2 for one
    EfficientNet-Lite0 step, 1.27.0 aarch64 vs 1.32.0 x86_64), and a few steps cannot compound it
    past 1e-4 unless a kernel is wrong. Element-wise relative error is not used: elements that are
    differences of near-equal gradients have no meaningful relative precision.
  - prediction scores: relative 1e-4 (LDA scores, ~1e4: the head's solve amplifies embedding
    rounding; 3e-6 seen when both runtimes run the same weights).
- Inference at the adapted delta, on each machine: edgecl's runner (patched weights as initializer
  overrides, full optimization) vs the same weights baked into the file on the host and run with no
  graph optimization: relative L2 <= 1e-5 (float32 rounding; a skipped override shows as ~1e-3).
- The emulated onnxruntime must really run train_step.onnx: the launcher counts InferenceSession runs
  per model file (scripts/aarch64/edgecl_run.py, EDGECL_ORT_PROBE) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this tree's edgecl, whatever the interpreter has installed

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

LAUNCHER = REPO / "scripts" / "aarch64" / "edgecl_run.py"
EMBED_PROBE = REPO / "scripts" / "aarch64" / "embed_probe.py"
EMBED_RTOL = 1e-5
ORT_VERSION = "1.27.0"
LOSS_RTOL = 1e-4
ARRAY_RTOL = 1e-4
SCORE_RTOL = 1e-4
TASK_CLASSES = ["class0", "class1", "washer", "bolt"]
EXPORT_BATCH = 8


def write_images(root: Path, names: list[str], per_class: int, seed: int, size: int = 40) -> Path:
    """PNGs whose class is visible (edgecl.datasets.write_synthetic_classes, as tests/conftest.py)."""
    from edgecl.datasets import write_synthetic_classes

    return write_synthetic_classes(root, names, per_class, seed, size)


@dataclass
class Runner:
    name: str
    prefix: list[str]                 # argv before the launcher's own arguments
    env: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def edgecl(self, work: Path, what: str, *args: object) -> str:
        probe = work / f"probe-{self.name}-{what}.json"
        env = dict(self.env, EDGECL_ORT_PROBE=str(probe))
        t0 = time.perf_counter()
        done = subprocess.run([*self.prefix, str(LAUNCHER), what, *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=3600)
        self.seconds[what] = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"FAIL: {self.name} `edgecl {what}` exited {done.returncode}:\n{done.stderr[-3000:]}")
        self.probes[what] = json.loads(probe.read_text())
        return done.stdout

    def python(self, work: Path, script: Path, *args: object) -> None:
        done = subprocess.run([*self.prefix, str(script), *map(str, args)], cwd=work, env=self.env,
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"FAIL: {self.name} {script.name} exited {done.returncode}:\n{done.stderr[-3000:]}")


def base_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Bytecode for both interpreters outside the repo (reused between runs: emulated compiling is slow).
    env["PYTHONPYCACHEPREFIX"] = str(cache / "pycache")
    return env


def runners(cache: Path) -> tuple[Runner, Runner]:
    sysroot, site = cache / "sysroot", cache / "site"
    x86 = Runner("x86_64", [sys.executable], base_env(cache))
    arm_env = dict(base_env(cache), PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PYTHONNOUSERSITE="1")
    qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
    arm = Runner("aarch64", [qemu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11")], arm_env)
    return x86, arm


def profile(path: Path, name: str, arch: str) -> Path:
    # One onnxruntime thread on both sides: the CPU is shared, and it keeps the comparison to kernels.
    path.write_text(f'name = "{name}"\narch = "{arch}"\nexecution_provider = "CPUExecutionProvider"\n'
                    f"threads = 1\nbatch_size = {EXPORT_BATCH}\n")
    return path


def run_device_path(runner: Runner, work: Path, bundle: Path, data: Path, prof: Path) -> dict[str, Any]:
    images = sorted(str(p.relative_to(work)) for p in data.rglob("*.png"))
    adapt = json.loads(runner.edgecl(work, "adapt", bundle, "--data", data, "--epochs", 1, "--no-gate",
                                     "--seed", 3, "-q", "--json", "--device", prof))
    predict = json.loads(runner.edgecl(work, "predict", bundle, *images, "--json", "--device", prof))
    evaluate = json.loads(runner.edgecl(work, "eval", bundle, "--data", data, "--json", "--device", prof))
    delta_path = work / f"delta-{runner.name}.safetensors"
    runner.edgecl(work, "delta", bundle, "-o", delta_path)
    gen = bundle / "state" / adapt["state"]
    steps = [json.loads(line) for line in (gen / "steps.jsonl").read_text().splitlines() if line.strip()]
    with safe_open(str(delta_path), "np") as f:
        delta_meta = f.metadata()
    return {"adapt": adapt, "predict": predict, "eval": evaluate, "steps": steps,
            "trainable": load_file(str(gen / "trainable.safetensors")), "delta": load_file(str(delta_path)),
            "delta_meta": delta_meta}


def bake_inference(bundle: Path, trainable: Path, out: Path) -> Path:
    """inference.onnx with W0 + scatter(delta) written into its initializers (host side: needs onnx)."""
    import onnx
    from onnx import numpy_helper

    from edgecl.device.ort import patched_weights
    from edgecl.formats import manifest as mf
    from edgecl.formats.mask import Mask
    from edgecl.formats.weights import load_weights

    mask = Mask.load_file(bundle / mf.MASK)
    patched = patched_weights(mask, load_weights(bundle / mf.WEIGHTS, names=mask.order),
                              load_file(str(trainable))[mf.DELTA_PARAM])
    model = onnx.load(str(bundle / mf.INFERENCE_MODEL))
    for init in model.graph.initializer:
        if init.name in patched:
            init.CopyFrom(numpy_helper.from_array(patched.pop(init.name), init.name))
    if patched:
        raise SystemExit(f"FAIL: masked tensors missing from inference.onnx: {sorted(patched)}")
    onnx.save(model, str(out))
    return out


def probe_inputs(work: Path, bundle: Path, data: Path, trainable: Path) -> tuple[Path, Path]:
    from edgecl.formats.images import load_image_folder
    from edgecl.formats.manifest import load_manifest
    from edgecl.formats.preprocess import normalize

    manifest = load_manifest(bundle)
    folder = load_image_folder(data, manifest.input_size, manifest.interpolation)
    images = work / "probe-images.npy"
    np.save(images, normalize(folder.pixels[:8], manifest.mean, manifest.std))
    return images, bake_inference(bundle, trainable, work / "probe-baked.onnx")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclass
class Table:
    rows: list[tuple[str, str, str, str, bool]] = field(default_factory=list)

    def add(self, what: str, x86: object, arm: object, measure: str, ok: bool) -> None:
        self.rows.append((what, str(x86), str(arm), measure, bool(ok)))

    def print(self) -> None:
        heads = ("check", "x86_64", "aarch64 (qemu)", "difference / tolerance", "ok")
        cells = [heads, *[(*r[:4], "ok" if r[4] else "MISMATCH") for r in self.rows]]
        widths = [min(max(len(c[i]) for c in cells), 48) for i in range(5)]
        for i, c in enumerate(cells):
            print("  ".join(s[:48].ljust(w) for s, w in zip(c, widths, strict=True)))
            if i == 0:
                print("  ".join("-" * w for w in widths))

    @property
    def ok(self) -> bool:
        return all(r[4] for r in self.rows)


def compare(x: dict[str, Any], a: dict[str, Any], probe: dict[str, Any]) -> tuple[Table, dict[str, float]]:
    t = Table()
    worst: dict[str, float] = {}
    t.add("step graph ran on aarch64", "-", f"{probe['machine']}, onnxruntime {probe['onnxruntime']}, "
          f"train_step.onnx x{probe['session_runs'].get('train_step.onnx', 0)}",
          "must be aarch64 and > 0 runs",
          probe["machine"] == "aarch64" and probe["session_runs"].get("train_step.onnx", 0) == len(a["steps"]) > 0)
    t.add("steps", len(x["steps"]), len(a["steps"]), "equal", len(x["steps"]) == len(a["steps"]))
    loss_worst = 0.0
    for sx, sa in zip(x["steps"], a["steps"], strict=False):
        rel = abs(sa["loss"] - sx["loss"]) / max(abs(sx["loss"]), 1e-30)
        loss_worst = max(loss_worst, rel)
        t.add(f"step {sx['step']} loss", f"{sx['loss']:.7f}", f"{sa['loss']:.7f}",
              f"rel {rel:.1e} <= {LOSS_RTOL:.0e}", rel <= LOSS_RTOL)
        same = (sx["gated"], sx["changed"]) == (sa["gated"], sa["changed"])
        t.add(f"step {sx['step']} gated/changed", f"{sx['gated']}/{sx['changed']}",
              f"{sa['gated']}/{sa['changed']}", "equal", same)
    worst["loss_rel"] = loss_worst
    for name in sorted(x["trainable"]):
        vx, va = x["trainable"][name], a["trainable"][name]
        rel = rel_l2(va, vx)
        worst[f"{name}_rel_l2"] = rel
        support = np.array_equal(vx != 0, va != 0)
        t.add(f"state {name} [{vx.size}]", f"|.|={np.linalg.norm(vx):.6g}", f"|.|={np.linalg.norm(va):.6g}",
              f"rel L2 {rel:.1e} <= {ARRAY_RTOL:.0e}, support {'equal' if support else 'DIFFERS'}",
              rel <= ARRAY_RTOL and support)
    dx, da = x["delta"], a["delta"]
    t.add("delta file bitmap", f"{int(np.unpackbits(dx['delta.bitmap']).sum())} set",
          f"{int(np.unpackbits(da['delta.bitmap']).sum())} set", "equal",
          np.array_equal(dx["delta.bitmap"], da["delta.bitmap"]))
    for name in ("delta.values", "prototypes.means"):
        same_shape = dx[name].shape == da[name].shape
        rel = rel_l2(da[name], dx[name]) if same_shape else float("inf")
        worst[f"{name}_rel_l2"] = rel
        t.add(f"delta file {name}", f"{dx[name].shape}", f"{da[name].shape}",
              f"rel L2 {rel:.1e} <= {ARRAY_RTOL:.0e}", rel <= ARRAY_RTOL)
    t.add("delta file prototypes.counts", dx["prototypes.counts"].tolist(), da["prototypes.counts"].tolist(),
          "equal", np.array_equal(dx["prototypes.counts"], da["prototypes.counts"]))
    t.add("delta file steps/classes", f"{x['delta_meta']['steps']} {x['delta_meta']['classes']}",
          f"{a['delta_meta']['steps']} {a['delta_meta']['classes']}", "equal",
          (x["delta_meta"]["steps"], x["delta_meta"]["classes"]) == (a["delta_meta"]["steps"],
                                                                      a["delta_meta"]["classes"]))
    classes_same = [px["class"] for px in x["predict"]] == [pa["class"] for pa in a["predict"]]
    topk_same = all([k["class"] for k in px["top_k"]] == [k["class"] for k in pa["top_k"]]
                    for px, pa in zip(x["predict"], a["predict"], strict=True))
    t.add(f"predict: class + top-3 order ({len(x['predict'])} images)",
          f"{sum(p['class'] == Path(p['path']).parent.name for p in x['predict'])} right",
          f"{sum(p['class'] == Path(p['path']).parent.name for p in a['predict'])} right", "equal",
          classes_same and topk_same)
    sx = np.array([k["score"] for p in x["predict"] for k in p["top_k"]], np.float64)
    sa = np.array([k["score"] for p in a["predict"] for k in p["top_k"]], np.float64)
    score_rel = float(np.max(np.abs(sa - sx) / np.maximum(np.abs(sx), 1e-30))) if sx.shape == sa.shape else 1.0
    worst["score_rel"] = score_rel
    t.add("predict: top-3 scores", f"max |s| {np.max(np.abs(sx)):.6g}", f"max |s| {np.max(np.abs(sa)):.6g}",
          f"max rel {score_rel:.1e} <= {SCORE_RTOL:.0e}", score_rel <= SCORE_RTOL)
    ex, ea = x["eval"], a["eval"]
    per_x = {k: v["correct"] for k, v in ex["per_class"].items()}
    per_a = {k: v["correct"] for k, v in ea["per_class"].items()}
    t.add("eval: correct / images (per class equal)", f"{ex['correct']}/{ex['images']}",
          f"{ea['correct']}/{ea['images']}", "equal",
          (ex["correct"], ex["images"], per_x) == (ea["correct"], ea["images"], per_a))
    return t, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "aarch64",
                        help="what scripts/aarch64/setup.sh built (sysroot/, site/)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write the results here (default: CACHE/work/result.json)")
    args = parser.parse_args()
    cache = args.cache.resolve()
    if not (cache / f".ready-ort{ORT_VERSION}").exists() or shutil.which("qemu-aarch64-static") is None:
        print(f"error: no aarch64 sysroot in {cache}: run `bash scripts/aarch64/setup.sh {args.cache}` "
              "(root: installs qemu-user-static, downloads arm64 .debs and aarch64 wheels)", file=sys.stderr)
        return 2

    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from edgecl.host.export import ExportOptions, export_bundle

    t0 = time.perf_counter()
    calib = write_images(work / "calib", ["class0", "class1", "class2"], per_class=12, seed=0)
    data = write_images(work / "task", TASK_CLASSES, per_class=6, seed=21)
    export_bundle(REPO / "models" / "test_efficientnet.toml", calib, work / "bundle",
                  options=ExportOptions(batch_size=EXPORT_BATCH, progress=False))
    export_s = time.perf_counter() - t0

    x86, arm = runners(cache)
    results = {}
    for runner, arch in ((x86, "x86_64"), (arm, "aarch64")):
        bundle = work / f"bundle-{runner.name}"
        shutil.copytree(work / "bundle", bundle)
        prof = profile(work / f"profile-{runner.name}.toml", f"check_{runner.name}", arch)
        print(f"running the device path on {runner.name} ...", flush=True)
        results[runner.name] = run_device_path(runner, work, bundle, data, prof)

    table, worst = compare(results["x86_64"], results["aarch64"], arm.probes["adapt"])
    # Both machines embed the same images at the same (x86) delta, through edgecl's runner and through
    # the baked reference: says which side ran the weights it was given.
    trainable = work / "bundle-x86_64" / "state" / results["x86_64"]["adapt"]["state"] / "trainable.safetensors"
    images, baked = probe_inputs(work, work / "bundle", data, trainable)
    embeds = {}
    for runner in (x86, arm):
        out = work / f"embed-{runner.name}.npz"
        runner.python(work, EMBED_PROBE, work / "bundle", trainable, images, baked, out)
        embeds[runner.name] = dict(np.load(out))
    for side in ("x86_64", "aarch64"):
        rel = rel_l2(embeds[side]["runtime"], embeds[side]["reference"])
        worst[f"embed_runtime_vs_baked_{side}"] = rel
        table.add(f"{side}: runner vs baked weights", "-" if side == "aarch64" else f"rel L2 {rel:.1e}",
                  "-" if side == "x86_64" else f"rel L2 {rel:.1e}", f"<= {EMBED_RTOL:.0e}", rel <= EMBED_RTOL)
    rel = rel_l2(embeds["aarch64"]["reference"], embeds["x86_64"]["reference"])
    worst["embed_reference_x86_vs_arm"] = rel
    table.add("baked reference embeddings", "8 x 256", "8 x 256", f"rel L2 {rel:.1e} <= {ARRAY_RTOL:.0e}",
              rel <= ARRAY_RTOL)
    probe_x, probe_a = x86.probes["adapt"], arm.probes["adapt"]
    print()
    print(f"x86_64: python {probe_x['python']}, onnxruntime {probe_x['onnxruntime']}, numpy {probe_x['numpy']}")
    print(f"aarch64 (qemu-aarch64-static, -L {cache / 'sysroot'}): python {probe_a['python']}, "
          f"onnxruntime {probe_a['onnxruntime']}, numpy {probe_a['numpy']}")
    print(f"export {export_s:.1f} s (x86); seconds per command: " + ", ".join(
        f"{w} {x86.seconds[w]:.1f} vs {arm.seconds[w]:.1f}" for w in x86.seconds))
    print(f"median step: x86 {results['x86_64']['adapt']['step_seconds_median']:.3f} s, "
          f"aarch64 emulated {results['aarch64']['adapt']['step_seconds_median']:.3f} s")
    print()
    table.print()
    print()
    if table.ok:
        print("PASS: aarch64 matches x86_64")
    else:
        print("FAIL: " + "; ".join(r[0] for r in table.rows if not r[4]))
    (args.json_out or work / "result.json").write_text(json.dumps({
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": platform.machine(),
        "ok": table.ok, "worst": worst, "x86_64": probe_x, "aarch64": probe_a,
        "seconds": {"x86_64": x86.seconds, "aarch64": arm.seconds, "export": export_s},
        "step_seconds_median": {r: results[r]["adapt"]["step_seconds_median"] for r in results},
        "losses": {r: [s["loss"] for s in results[r]["steps"]] for r in results},
        "rows": table.rows}, indent=1))
    return 0 if table.ok else 1


if __name__ == "__main__":
    sys.exit(main())
