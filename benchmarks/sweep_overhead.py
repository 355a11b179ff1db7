"""What `forgelab sweep` costs on top of the trials it runs, measured in one run:
  * wall time of N trials run by the sweep (search, state writes, polling, reading metrics, the final
    comparison) against the same N commands run one after another by a plain loop: ratio and seconds per trial;
  * one bayes suggestion and one hyperband check with many finished trials on disk (the check runs every
    POLL_SECONDS while a trial trains, so it must stay a small fraction of that).
The trials are the tests' stand-in program (tests/sweep_program.py: writes a run directory, no Lightning), each
busy for `--trial-seconds`, so the numbers isolate the controller. Target: under 1 s per trial beyond the
sweep's fixed start-up, and a check well under POLL_SECONDS (1 s).

    python benchmarks/sweep_overhead.py [--trials 6] [--trial-seconds 1.0] [--history 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common.experiment.sweep import LocalSweep, Trial, trial_command

PROGRAM = Path(__file__).resolve().parents[1] / "tests" / "sweep_program.py"


def _definition(values: list[float], epochs: int, sleep: float, method: str = "grid") -> dict:
    return {
        "name": "bench",
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
        "parameters": {
            "x": {"values": values} if method == "grid" else {"min": 0.0, "max": 1.0},
            "epochs": {"value": epochs},
            "sleep": {"value": sleep},
        },
        "command": ["${interpreter}", str(PROGRAM), "${args}"],
    }


def run(trials: int = 6, trial_seconds: float = 1.0, history: int = 40) -> dict[str, float]:
    epochs = 5
    values = [round(0.3 + 0.01 * i, 3) for i in range(trials)]  # all close to the optimum: none stopped early
    definition = _definition(values, epochs, trial_seconds / epochs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for i, x in enumerate(values):
            env = dict(os.environ, FORGELAB_RUN_DIR=str(root / "direct" / f"trial-{i:03d}"))
            command = trial_command(definition, {"x": x, "epochs": epochs, "sleep": trial_seconds / epochs})
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        direct = time.perf_counter() - start

        def sweep(n: int, name: str) -> float:
            """Wall time of `forgelab sweep` running the first n grid points (process start to exit)."""
            sweep_file = root / f"{name}.yaml"
            sweep_file.write_text(yaml.safe_dump(definition | {"name": name}))
            main = "import sys; from common.experiment.sweep import main; main(sys.argv[1:])"
            command = [sys.executable, "-c", main, str(sweep_file), "--root", str(root), "--count", str(n)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start

        one = sweep(1, "bench_one")
        swept = sweep(trials, "bench_all")

        # a sweep with `history` finished trials on disk: one suggestion, one hyperband check
        many = LocalSweep(_definition([0.0], 12, 0.0, method="bayes"), root / "sweeps" / "many", "bench.yaml")
        many.directory.mkdir(parents=True)
        for i in range(history):
            trial_dir = many.directory / f"trial-{i:03d}"
            trial_dir.mkdir()
            rows = ["epoch,step,val/loss"] + [
                f"{e},{e},{(i / history - 0.3) ** 2 + 1 / (e + 1)}" for e in range(12)
            ]
            (trial_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
            many.trials.append(Trial(index=i, params={"x": i / history}, state="finished"))
        running = Trial(index=history, params={"x": 0.9}, state="running")
        many.trials.append(running)
        start = time.perf_counter()
        many.suggest(history + 1)
        suggest = time.perf_counter() - start
        start = time.perf_counter()
        many.should_stop_early(running)
        check = time.perf_counter() - start
    per_trial_direct = direct / trials
    per_trial_swept = (swept - one) / (trials - 1)  # the fixed start-up and comparison cancel out
    return {
        "direct_s": direct,
        "sweep_s": swept,
        "ratio": swept / direct,
        "fixed_s": one - per_trial_swept,
        "overhead_per_trial_s": per_trial_swept - per_trial_direct,
        "marginal_ratio": per_trial_swept / per_trial_direct,
        "bayes_suggest_s": suggest,
        "hyperband_check_s": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--trial-seconds", type=float, default=1.0)
    parser.add_argument("--history", type=int, default=40)
    args = parser.parse_args()
    result = run(args.trials, args.trial_seconds, args.history)
    print(f"{args.trials} trials of ~{args.trial_seconds:.1f} s each")
    print(f"  plain loop            {result['direct_s']:7.2f} s")
    print(f"  forgelab sweep        {result['sweep_s']:7.2f} s   ratio {result['ratio']:.2f}x")
    print(f"  fixed cost            {result['fixed_s']:7.2f} s   (start-up imports; final comparison, plots)")
    print(
        f"  overhead per trial    {result['overhead_per_trial_s']:7.2f} s   "
        f"(a trial in a sweep / alone: {result['marginal_ratio']:.2f}x)"
    )
    print(f"with {args.history} finished trials on disk:")
    print(f"  bayes suggestion      {result['bayes_suggest_s'] * 1000:7.0f} ms")
    print(
        f"  hyperband check       {result['hyperband_check_s'] * 1000:7.0f} ms   (runs every 1 s while a trial trains)"
    )


if __name__ == "__main__":
    main()
