"""`forgelab extract` on several ranks (`ddp_sim`: two CPU processes through Lightning Fabric): the cache it writes
holds bitwise the features a single process writes, each entry once, and a rank killed mid-run loses nothing
committed; a rerun on one rank completes the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.distributed import Ranks, fabric_settings, launch, trainer_section
from common.errors import ConfigError
from projects.item_detector.cache import FeatureCache
from tests.cli_helpers import CONFIGS, item_subset, kill_one_spawned_rank, run_cli, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = CONFIGS / "item_detector" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"
DDP_SIM = CONFIGS / "trainer" / "ddp_sim.yaml"
# the generative tiny captioner and grounder: every stage of the frozen pipeline runs, not the oracles
GENERATIVE = ["--data.init_args.captioner.name=blip2", "--data.init_args.grounder.name=grounding_dino"]
# 3 extraction batches per split of 12 images: rank 0 runs batches 0 and 2, rank 1 batch 1
BATCHES = ["--data.init_args.extract_batch_size=4"]


def test_shares_are_disjoint_cover_everything_and_match_lightnings_sampler() -> None:
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    for n in (0, 1, 5, 12):
        for world in (1, 2, 3):
            shares = [list(Ranks(r, world).share(n)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            for batch in (1, 2, 4):  # whole batches: rank r runs batches r, r + world, ... of one process's
                parts = [Ranks(r, world).share_batches(n, batch) for r in range(world)]
                assert sorted(i for part in parts for i in part) == list(range(n))
                single = [list(range(n))[b : b + batch] for b in range(0, n, batch)]
                for r, part in enumerate(parts):
                    assert [part[b : b + batch] for b in range(0, len(part), batch)] == single[r::world]
            if n >= world:  # Lightning's sampler asserts on a rank without items
                for r in range(world):
                    sampler = UnrepeatedDistributedSampler(
                        range(n), num_replicas=world, rank=r, shuffle=False
                    )
                    assert list(sampler) == shares[r]


def test_fabric_settings_take_the_trainer_keys_and_build_the_plugins() -> None:
    import yaml
    from lightning.fabric.plugins.environments import LightningEnvironment

    trainer = yaml.safe_load(DDP_SIM.read_text())["trainer"]
    settings = fabric_settings(trainer)
    assert set(settings) == {"accelerator", "devices", "strategy", "plugins"}
    assert settings["strategy"] == "ddp_spawn" and settings["devices"] == 2
    assert [type(p) for p in settings["plugins"]] == [LightningEnvironment]
    assert fabric_settings(None) == {}
    slurm = fabric_settings(yaml.safe_load((CONFIGS / "trainer" / "slurm.yaml").read_text())["trainer"])
    (environment,) = slurm["plugins"]
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue
    assert (slurm["devices"], slurm["num_nodes"], slurm["strategy"]) == (4, 2, "ddp")


def extract_args(toy: Path, cache: Path, runs: Path, trainer: Path, *extra: str) -> list[str]:
    subset = item_subset(toy, per_label=3)
    overrides = tiny_overrides(TINY, toy)
    overrides = [a for a in overrides if "_root=" not in a and "cache_dir=" not in a]
    return [
        "extract",
        "--config",
        str(trainer),
        "--config",
        str(TINY),
        *overrides,
        *GENERATIVE,
        *BATCHES,
        f"--data.init_args.train_root={subset / 'train.jsonl'}",
        f"--data.init_args.val_root={subset / 'val.jsonl'}",
        f"--data.init_args.test_root={subset / 'test.jsonl'}",
        f"--data.init_args.cache_dir={cache}",
        f"--run.root={runs}",
        *extra,
    ]


def cache_contents(root: Path) -> dict[tuple[str, str], tuple]:
    """(stage dir, entry key) -> everything cached for it, read through the verified loader; asserts that no
    entry is committed twice."""
    contents = {}
    for manifest_path in sorted(root.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        keys = [k for record in manifest["shards"].values() for k in record["keys"]]
        assert len(keys) == len(set(keys)), "an entry was committed twice"
        cache = FeatureCache(root, manifest["descriptor"])
        assert cache.dir == manifest_path.parent
        table, skipped = cache.load(keys)
        assert len(table) == len(keys) and cache.dropped_shards == 0
        for i, key in enumerate(table.keys):
            row = table.select([i])
            tensors = tuple(
                getattr(row, name)
                for name in (
                    "global_image",
                    "global_text",
                    "local_image",
                    "local_text",
                    "boxes",
                    "box_scores",
                )
            )
            contents[(manifest_path.parent.name, key)] = (row.captions[0], row.phrases[0], *tensors)
        contents |= {(manifest_path.parent.name, k): ("skipped", r) for k, r in skipped.items()}
    return contents


def assert_same_cache(ours: Path, reference: Path) -> None:
    a, b = cache_contents(ours), cache_contents(reference)
    assert a.keys() == b.keys() and a
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), key  # bitwise
            else:
                assert x == y, key


def one_thread_cli(args: list[str]) -> tuple[int, str, str]:
    """`run_cli` with one torch thread, as each of ddp_sim's two ranks runs on 2 cores (Lightning gives a CPU rank
    the cores divided by the ranks): a reduction split over another number of threads may round differently.
    The ranks run one process's batches (`Ranks.share_batches`), so the arithmetic is the same otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process_cache(small_toy_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one_rank")
    code, _, err = one_thread_cli(extract_args(small_toy_world, root / "cache", root / "runs", CPU))
    assert code == 0, err
    return root / "cache"


@pytest.mark.slow
def test_two_ranks_write_bitwise_the_single_process_cache(small_toy_world, single_process_cache, tmp_path):
    code, _, err = run_cli(extract_args(small_toy_world, tmp_path / "cache", tmp_path / "runs", DDP_SIM))
    assert code == 0, err
    assert_same_cache(tmp_path / "cache", single_process_cache)
    (run,) = (tmp_path / "runs" / "item_detector").glob("extract-*")  # one run record, rank 0's
    assert json.loads((run / "run.json").read_text())["ranks"] == 2
    report = json.loads((run / "extract_report.json").read_text())
    train = report["extraction"]["train/none"]
    assert train["ranks"] == 2 and len(train["rank_seconds"]) == 2
    assert (
        train["extracted"] + train["skipped"] == train["requested"] == 12
    )  # each image once, over both ranks


@pytest.mark.slow
def test_a_rank_killed_mid_run_loses_nothing_and_one_rank_completes_the_cache(
    small_toy_world, single_process_cache, tmp_path
):
    cache = tmp_path / "cache"
    small_shards = ["--data.init_args.shard_size=1"]
    command = [sys.executable, "-m", "common.experiment.cli"]
    command += extract_args(small_toy_world, cache, tmp_path / "runs", DDP_SIM, *small_shards)
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed: set[str] = set()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and parent.poll() is None:  # wait for the first committed shards
            manifests = list(cache.glob("*/manifest.json"))
            if manifests:
                shards = json.loads(manifests[0].read_text())["shards"]
                if len(shards) >= 3:
                    committed = {f"{manifests[0].parent.name}/{name}" for name in shards}
                    break
            time.sleep(0.05)
        assert committed, "no shard was committed before the deadline"
        kill_one_spawned_rank(parent)  # one rank dies mid-run; the launcher ends the other
    finally:
        if parent.poll() is None:
            parent.kill()
    after_kill = {
        f"{path.parent.name}/{name}"
        for path in cache.glob("*/manifest.json")
        for name in json.loads(path.read_text())["shards"]
    }
    assert committed <= after_kill  # nothing committed before the kill is lost

    code, _, err = one_thread_cli(extract_args(small_toy_world, cache, tmp_path / "runs", CPU))
    assert code == 0, err
    assert_same_cache(cache, single_process_cache)
    runs = sorted((tmp_path / "runs" / "item_detector").glob("extract-*/extract_report.json"))
    report = json.loads(runs[-1].read_text())["extraction"]
    # the rerun computed only what the killed run had not committed, and kept the killed run's shards
    assert sum(stats["extracted"] + stats["skipped"] for stats in report.values()) <= 36 - len(committed)
    final = {
        f"{path.parent.name}/{name}"
        for path in cache.glob("*/manifest.json")
        for name in json.loads(path.read_text())["shards"]
    }
    assert after_kill <= final


@pytest.mark.slow
def test_a_ddp_fit_extracts_its_shares_in_setup_into_the_same_cache(
    small_toy_world, single_process_cache, tmp_path
):
    """The extraction `fit` triggers (ItemFeatures.setup on every rank of the Trainer's DDP): each rank takes its
    share, the cache equals one process's, and training and testing go on from it."""
    args = extract_args(small_toy_world, tmp_path / "cache", tmp_path / "runs", DDP_SIM)
    code, _, err = run_cli(
        ["fit", *args[1:], "--trainer.max_epochs=1", "--run.name=ddp", "--run.wandb=false"]
    )
    assert code == 0, err
    assert_same_cache(tmp_path / "cache", single_process_cache)
    run = tmp_path / "runs" / "item_detector" / "ddp"
    frozen = json.loads((run / "frozen_stage.json").read_text())
    extraction = frozen["extraction"]  # written again at test start: the test split's extraction
    assert extraction and all(stats["ranks"] == 2 for stats in extraction.values()), extraction
    assert json.loads((run / "test_metrics.json").read_text())["pooled"]["n"] == 12


def _world_size() -> int:
    from common.distributed import current_ranks

    return current_ranks().world_size


def test_without_a_preset_naming_devices_a_job_runs_in_this_process(tmp_path) -> None:
    assert launch(None, _world_size) == 1
    assert launch({"accelerator": "cpu", "devices": "auto", "strategy": "ddp"}, _world_size) == 1


def test_trainer_section_merges_files_and_names_a_bad_one(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("trainer:\n  accelerator: cpu\n  devices: 2\n")
    (tmp_path / "b.yaml").write_text("seed_everything: 1\ntrainer:\n  devices: 1\n")
    assert trainer_section([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == {
        "accelerator": "cpu",
        "devices": 1,
    }
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: expected a mapping"):
        trainer_section([str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match="cannot read the trainer config"):
        trainer_section([str(tmp_path / "missing.yaml")])
