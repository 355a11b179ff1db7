"""`forgelab extract`: run ITEM's frozen stage over a config's data ahead of training, into the feature cache.

    forgelab extract --config configs/trainer/gpu.yaml --config configs/item_detector/item_vitl14.yaml \
        --config configs/item_detector/data/progan_cnndetection.yaml [--splits train val test]

It reads the same config files as `forgelab fit` (the `data` section; `trainer`'s accelerator, devices,
num_nodes, strategy and plugins say on how many ranks to run, as for fit: `configs/trainer/ddp.yaml` on all GPUs
of a node under torchrun or srun, `ddp_sim.yaml` for two CPU processes; `run.project`/`run.root` say where the
report goes; model is accepted and ignored), so the cache keys are exactly the ones training will look up. Each
rank extracts a disjoint share of what the cache lacks and commits its own shards (`ensure_features`); the
result is the cache one process would write, and an interrupted run resumes on any number of ranks. Extraction
shows a progress bar per split and test condition, commits a shard every `data.init_args.shard_size` images,
resumes after an interruption from the last committed shard, and builds each split's per-image view
(`view.py`) that training streams.
A report (`extract_report.json`: requested, already cached, extracted, undecodable, seconds, images/s, and
ITEM's input checks per split) goes to `runs/<project>/extract-<time>/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from common.distributed import current_ranks, launch
from common.errors import ConfigError
from common.experiment.runs import RunSettings, recording_outcome, resolve_run_dir, start_run_record
from common.io import write_json
from projects.item_detector.data import ItemFeatures


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="forgelab extract",
        description="Extract ITEM's frozen features (captions, boxes, CLIP embeddings) into the feature cache.",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the experiment's config files, as for fit")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    # the Trainer's own arguments, merged across --config files as fit merges them; only the keys that say where
    # ranks run are used (common.distributed.fabric_settings)
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False)
    for section in ("model", "run"):  # accepted so that fit's config files parse; run.project/root are read
        parser.add_argument(f"--{section}", type=dict | None, default=None)
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    parser.add_argument(
        "--splits", type=list[str], default=["train", "val", "test", "predict"], help="splits to extract"
    )
    return parser


def main(argv: list[str]) -> None:
    config = build_parser().parse_args(argv)
    _datamodule(config)  # a bad data config fails here, once, before any rank starts
    launch(config.trainer.as_dict(), _extract_on_rank, argv)


def _datamodule(config: Any) -> ItemFeatures:
    try:
        datamodule = build_parser().instantiate_classes(config).data
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid data config: {err}") from None
    if not isinstance(datamodule, ItemFeatures):
        raise ConfigError(
            f"forgelab extract needs an ItemFeatures datamodule, got {type(datamodule).__name__}"
        )
    if datamodule.cache_dir is None:
        raise ConfigError("data.init_args.cache_dir is null: there is no cache to extract into")
    return datamodule


def _extract_on_rank(argv: list[str]) -> None:
    """One rank's extraction (every rank parses the same files: a spawned rank gets the arguments, not objects);
    rank 0 keeps the run record and writes the report."""
    config = build_parser().parse_args(argv)
    datamodule = _datamodule(config)
    ranks = current_ranks()
    if not ranks.is_main:
        _extract(datamodule, config.splits, None)
        return
    run = dict(config.run or {})
    settings = RunSettings(
        project=run.get("project", "item_detector"), root=run.get("root", "runs"), job_type="extract"
    )
    run_dir, _ = resolve_run_dir(settings, "extract", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = start_run_record(run_dir, settings, False, None, ["extract", *argv])
    record["ranks"] = ranks.world_size
    write_json(run_dir / "run.json", record)
    with recording_outcome(run_dir, record):
        _extract(datamodule, config.splits, run_dir)


def _extract(datamodule: ItemFeatures, splits: list[str], run_dir: Path | None) -> None:
    datamodule.extract_missing = True
    datamodule.prepare_data()
    datamodule._index()
    for split in splits:
        if split not in datamodule.samples:
            continue
        for condition in datamodule.conditions(split):
            datamodule.features(split, condition)
    datamodule.stage.close()
    if run_dir is None:
        return

    report: dict[str, Any] = {
        "cache_dir": str(datamodule.cache_dir),
        "descriptor": datamodule.stage.descriptor("<per condition>"),
        "extraction": datamodule.extraction,
        "feature_health": datamodule.feature_health,
        "indexing_skips": datamodule.skip_summary(),
    }
    write_json(run_dir / "extract_report.json", report)
    lines = [f"{'split/condition':<22} {'images':>7} {'cached':>7} {'new':>6} {'skipped':>8} {'img/s':>8}"]
    for name, dataset in datamodule.datasets.items():
        key = f"{name[0]}/{name[1]}"
        stats = datamodule.extraction.get(key, {})
        cached = stats.get("cached", len(dataset.samples))
        lines.append(
            f"{key:<22} {len(dataset.samples):>7} {cached:>7} {stats.get('extracted', 0):>6} "
            f"{stats.get('skipped', 0):>8} {stats.get('images_per_s', '-'):>8}"
        )
    print("\n".join(lines))
    print(f"forgelab: feature cache {datamodule.cache_dir}; report in {run_dir / 'extract_report.json'}")
    if datamodule.feature_health:
        print("input checks: " + json.dumps(datamodule.feature_health), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
