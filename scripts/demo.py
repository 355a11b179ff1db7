"""`make demo`: every project's main job on the embedded toy world, tiny presets, CPU, end to end.

Each stage is a real `forgelab` command (the same a user types); the demo prints each stage's result table and
where its run files went, then a timing summary. Stages can be chosen: `python scripts/demo.py classifier`; the `sweep`
stage and the single-detector `classifier` and `item` stages (the benchmark stage trains both configs) run only
when named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("FORGELAB_DEMO_RUNS", "runs/demo"))


@dataclass
class Stage:
    name: str
    title: str
    command: list[str]
    project: str  # runs/demo/<project>/<run name>/
    run_name: str
    results: tuple[str, ...]  # files in the run directory to print
    requires: tuple[str, ...] = ()  # stages whose runs this one reads (run first when this one is chosen)
    place: tuple[str, str] = (
        "--run.root",
        "--run.name",
    )  # the command's options for its output root and name
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables of the command
    default: bool = True  # part of a bare `make demo`; False: runs only when named (`scripts/demo.py sweep`)


# The fine-grained guidance stages run tiny models on 32-64 px images: one OpenMP thread is several times faster
# than two there (each small op's thread synchronisation dominates), and collapses far less on a shared machine.
FG_ENV = (("OMP_NUM_THREADS", "1"),)


def forgelab() -> str:
    found = shutil.which("forgelab", path=str(Path(sys.executable).parent))
    return found or "forgelab"


STAGES: list[Stage] = [
    Stage(
        name="classifier",
        title="Paper 003 Table 3 shape: real-vs-generated classifier (tiny ResNet-50) on the toy world",
        command=[
            "fit",
            "--config",
            "configs/trainer/cpu.yaml",
            "--config",
            "configs/inpaint_probe/tiny.yaml",
        ],
        project="inpaint_probe",
        run_name="classifier",
        results=("test_per_generator.md",),
        default=False,  # the benchmark stage trains the same config next to the other detectors
    ),
    Stage(
        name="inpaint_pconv",
        title="Paper 003 Sec. 3: Liu et al. partial-convolution inpainter (tiny) trained on the toy world's real renders",
        command=[
            "fit",
            "--config",
            "configs/trainer/cpu.yaml",
            "--config",
            "configs/inpaint_probe/partial_conv_tiny.yaml",
        ],
        project="inpaint_probe",
        run_name="partial_conv",
        results=("test_by_hole_ratio.md",),
    ),
    Stage(
        name="inpaint_deepfill",
        title="Paper 003 Sec. 3: DeepFill v2 gated-convolution inpainter with SN-PatchGAN (tiny) on the same images",
        command=[
            "fit",
            "--config",
            "configs/trainer/cpu.yaml",
            "--config",
            "configs/inpaint_probe/deepfill_v2_tiny.yaml",
        ],
        project="inpaint_probe",
        run_name="deepfill_v2",
        results=("test_by_hole_ratio.md",),
    ),
    Stage(
        name="probe",
        title="Paper 003 Table 2 shape: both inpainters on real vs generated toy images, same masks, FID and NIQE",
        command=[
            "probe",
            "--config",
            "configs/inpaint_probe/probe_tiny.yaml",
            f"--probe.checkpoints.partial_conv={RUNS}/inpaint_probe/partial_conv/checkpoints/last.ckpt",
            f"--probe.checkpoints.gated_conv={RUNS}/inpaint_probe/deepfill_v2/checkpoints/last.ckpt",
        ],
        project="inpaint_probe",
        run_name="probe",
        results=("table2.md",),
        requires=("inpaint_pconv", "inpaint_deepfill"),
    ),
    Stage(
        name="item",
        title="ITEM Tables I-III and Fig. 4 shape: frozen features cached once, MLP head (tiny CLIP, oracle captions)",
        command=[
            "fit",
            "--config",
            "configs/trainer/cpu.yaml",
            "--config",
            "configs/item_detector/tiny.yaml",
        ],
        project="item_detector",
        run_name="item",
        results=("test_paper_tables.md", "test_robustness.md"),
        default=False,  # the benchmark stage trains the same config next to the other detectors
    ),
    Stage(
        name="benchmark",
        title="Detectors compared (ITEM Tables I-II and Fig. 4 shape): classifier, ITEM, UniFD, CNNDetection, NPR on the same toy data",
        command=["benchmark", "configs/benchmarks/toy.yaml"],
        project="benchmarks",  # runs/demo/benchmarks/toy/: table.md, robustness.md, the runs below runs/
        run_name="toy",
        results=("table.md", "robustness.md"),
        place=("--root", "--name"),
    ),
    Stage(
        name="fg_generator",
        title="Fine-grained guidance Sec. 3: tiny SD + LoRA trained through the DDIM cycle with Eq. 1-5 and GradNorm",
        command=[
            "fit",
            "--config",
            "configs/trainer/cpu.yaml",
            "--config",
            "configs/fg_guidance/tiny.yaml",
            "--trainer.limit_train_batches=8",
        ],
        project="fg_guidance",
        run_name="fg_generator",
        results=("generator/generator.json",),
        env=FG_ENV,
    ),
    Stage(
        name="fg_augment",
        title="Fine-grained guidance Sec. 4: `forgelab augment` with the trained generator (view/ageing/lighting prompts)",
        command=[
            "augment",
            f"--generator={RUNS}/fg_guidance/fg_generator/generator",
            "--fraction=0.1",
        ],
        project="fg_guidance",
        run_name="fg_augmented",
        results=("dataset.json",),
        requires=("fg_generator",),
        place=("--root", "--name"),
        env=FG_ENV,
    ),
    Stage(
        name="fg_table1",
        title="Fine-grained guidance Table 1 shape: subtype accuracy without/with the generated set, step-matched, 3 seeds (tiny ResNet-101, FineLIP-style)",
        command=[
            "fg-table1",
            f"--augmented={RUNS}/fg_guidance/fg_augmented/manifest.jsonl",
            "--method-config=ResNet-101=configs/fg_guidance/tables/table1_toy_resnet101.yaml",
            "--method-config=FineLIP=configs/fg_guidance/tables/table1_toy_finelip.yaml",
            "--seeds",
            "0",
            "1",
            "2",
            "--parallel=2",  # two (without, with) pairs at once, one core each
        ],
        project="fg_guidance",
        run_name="fg_table1",
        results=("table1.md",),
        requires=("fg_augment",),
        place=("--root", "--name"),
        env=FG_ENV,
    ),
    Stage(
        name="sweep",
        title="A W&B sweep file with no server: 3 bayes trials of the tiny classifier (lr, weight decay, backbone)",
        command=["sweep", "configs/sweeps/classifier_tiny.yaml", "--count", "3"],
        project="sweeps",  # runs/demo/sweeps/<name>/trial-NNN/, compared in compare/
        run_name="classifier_tiny",
        results=("compare/compare.md",),
        place=("--root", "--name"),
        default=False,  # keeps `make demo` within its 10 minutes; the sweep's own tests run it on every `make test`
    ),
]


def run_stage(stage: Stage) -> float:
    print(f"\n=== {stage.name}: {stage.title} ===", flush=True)
    run_dir = RUNS / stage.project / stage.run_name
    # the demo's runs (and the runs a stage starts under its name, e.g. Table 1's fits) are re-made each time;
    # real runs are never overwritten (forgelab refuses an existing run name without --ckpt_path last)
    for old in [run_dir, *run_dir.parent.glob(f"{stage.run_name}-*")]:
        if old.is_dir():
            shutil.rmtree(old)
    root_option, name_option = stage.place
    command = [forgelab(), *stage.command, f"{root_option}={RUNS}", f"{name_option}={stage.run_name}"]
    print("$ " + " ".join(command[:1] + [c if " " not in c else repr(c) for c in command[1:]]), flush=True)
    start = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **dict(stage.env)},
    )
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"demo stage {stage.name} failed (exit {completed.returncode})")
    for name in stage.results:
        path = run_dir / name
        print(path.read_text() if path.is_file() else f"(missing {path})")
    print(f"run files: {run_dir}  ({elapsed:.0f} s)")
    return elapsed


def main() -> None:
    os.chdir(REPO)
    os.environ.setdefault("WANDB_SILENT", "true")
    wanted = set(sys.argv[1:])
    unknown = wanted - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose from {[s.name for s in STAGES]}")
    total = time.perf_counter()
    from common.data.toy_world import ensure_toy_world

    start = time.perf_counter()
    ensure_toy_world("data/toy_world")
    timings = {"toy world": time.perf_counter() - start}
    for stage in reversed(STAGES):  # a chosen stage brings the stages it reads from (and theirs)
        if stage.name in wanted:
            wanted |= set(stage.requires)
    for stage in STAGES:
        if (not wanted and stage.default) or stage.name in wanted:
            timings[stage.name] = run_stage(stage)
    print("\n=== demo summary ===")
    for name, seconds in timings.items():
        print(f"  {name:<16} {seconds:6.0f} s")
    print(f"  {'total':<16} {time.perf_counter() - total:6.0f} s")
    print(f"W&B runs were written offline under {RUNS}/*/*/wandb: `wandb sync <dir>` uploads one.")


if __name__ == "__main__":
    main()
