"""A training program for the sweep controller's tests: writes a run directory the way `forgelab fit` does
(run.json, config.yaml, metrics.csv with one `val/loss` row per epoch) in milliseconds, so grid/random/bayes,
failures, hyperband, resuming and parallel trials can be tested without paying a Lightning start-up per trial;
a trial that ends writes ran.json (start and end time, CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS it saw).

    python tests/sweep_program.py --x=0.3 --epochs=5 [--sleep=0.1] [--fail=true]

val/loss at epoch e is (x - 0.3)^2 + 1 / (e + 1): lower is better, best at x = 0.3, decreasing with epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail", default="false")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    run_dir = Path(os.environ["FORGELAB_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (run_dir / "run.json").write_text(json.dumps({"name": run_dir.name, "group": "stand-in"}))
    (run_dir / "config.yaml").write_text(f"x: {args.x}\nepochs: {args.epochs}\nlabel: '{args.label}'\n")
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "val/loss"])
        handle.flush()
        for epoch in range(args.epochs):
            if args.fail == "true" and epoch == 1:
                print("ValueError: the stand-in program was told to fail", file=sys.stderr)
                raise SystemExit(3)
            writer.writerow([epoch, 10 * (epoch + 1), (args.x - 0.3) ** 2 + 1 / (epoch + 1)])
            handle.flush()
            time.sleep(args.sleep)
    # when it ran and on what: the parallel sweep's tests check the trials overlapped on different devices
    slot = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    (run_dir / "ran.json").write_text(json.dumps({"start": started, "end": time.time(), **slot}))
    print(f"done x={args.x}")


if __name__ == "__main__":
    main()
