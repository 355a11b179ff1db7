"""`python -m common.data.toy_world`: (re)generate a toy world and print its counts, time and size."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from common.data.toy_world.writer import ToyWorldSpec, _read_meta, ensure_toy_world, generate_toy_world


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m common.data.toy_world --root data/toy_world`: regenerate and print counts and time."""
    from common.data import toy_world  # the package docstring's first line describes the command

    parser = argparse.ArgumentParser(
        prog="python -m common.data.toy_world",
        description=(toy_world.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", default="data/toy_world")
    parser.add_argument("--ensure", action="store_true", help="only generate when missing or stale")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: automatic)")
    defaults = ToyWorldSpec()
    for f in dataclasses.fields(ToyWorldSpec):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "generators":
            parser.add_argument(flag, default=",".join(defaults.generators), help="comma-separated")
        else:
            parser.add_argument(flag, type=int, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyWorldSpec)}
    kwargs["generators"] = tuple(g for g in kwargs["generators"].split(",") if g)
    spec = ToyWorldSpec(**kwargs)
    t0 = time.monotonic()
    make = ensure_toy_world if args.ensure else generate_toy_world
    root = make(args.root, spec, num_workers=args.workers)
    seconds = time.monotonic() - t0
    meta = _read_meta(root) or {}
    summary = {
        "root": str(root),
        "spec_hash": meta.get("spec_hash"),
        "counts": meta.get("counts"),
        "seconds": round(seconds, 2),
        "disk_mb": round(_disk_bytes(root) / 2**20, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0
