"""ITEM's per-image view (projects/item_detector/view.py): its rows against a naive loop over the shards'
objects, the detector's D from it against D from every per-object embedding, rebuilds when the entries change,
no trust in an interrupted build, and the chunk shuffle.

The cache is written with synthetic embeddings through the real writer (`FeatureCache.commit`): no models."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from projects.item_detector import view as view_module
from projects.item_detector.cache import FeatureCache, FeatureTable
from projects.item_detector.data import FeatureDataset
from projects.item_detector.frozen import FLAG_NAMES
from projects.item_detector.model import ItemDetector
from projects.item_detector.view import ChunkSampler, ViewCorruptError, build_view, open_view, view_key

DIM = 6
COUNTS = [0, 3, 1, 2, 0, 4, 1, 1, 2, 0, 3]  # objects per image, with images where nothing was grounded


def synthetic_cache(
    root: Path, counts: list[int], shard: int = 4, seed: int = 0
) -> tuple[FeatureCache, list]:
    """A cache of len(counts) images with random embeddings, `shard` images per committed shard."""
    cache = FeatureCache(root, {"synthetic": seed})
    generator = torch.Generator().manual_seed(seed)
    keys = [f"{seed:04d}{i:060x}" for i in range(len(counts))]
    no_objects = FLAG_NAMES.index("no_objects")
    with cache.locked():
        for start in range(0, len(counts), shard):
            part = counts[start : start + shard]
            n, m = len(part), sum(part)
            flags = torch.zeros(n, len(FLAG_NAMES), dtype=torch.int64)
            flags[:, no_objects] = torch.tensor([int(c == 0) for c in part])
            cache.commit(
                FeatureTable(
                    keys=keys[start : start + n],
                    captions=[f"caption {start + i}" for i in range(n)],
                    phrases=[[f"part {j}" for j in range(c)] for c in part],
                    global_image=torch.randn(n, DIM, generator=generator),
                    global_text=torch.randn(n, DIM, generator=generator),
                    local_image=torch.randn(m, DIM, generator=generator),
                    local_text=torch.randn(m, DIM, generator=generator),
                    boxes=torch.rand(m, 4, generator=generator),
                    box_scores=torch.rand(m, generator=generator),
                    offsets=torch.tensor([0, *part], dtype=torch.int64).cumsum(0),
                    flags=flags,
                )
            )
    return cache, keys


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.pow(2).sum().sqrt()


def test_the_view_holds_a_naive_per_image_loop_over_the_shards_objects(tmp_path) -> None:
    cache, keys = synthetic_cache(tmp_path, COUNTS)
    view = build_view(cache, keys, chunk_rows=3)
    table, _ = cache.load(keys)
    assert len(view) == len(keys) and len(view.chunks) == 4 and sorted(view.keys) == sorted(keys)
    assert [chunk["rows"] for chunk in view.chunks] == [3, 3, 3, 2]
    for key in keys:
        row = table.key_index[key]
        start, end = int(table.offsets[row]), int(table.offsets[row + 1])
        d_global = unit(table.global_image[row]) - unit(table.global_text[row])
        d_local = torch.zeros(DIM)
        for i in range(start, end):
            d_local += unit(table.local_image[i]) - unit(table.local_text[i])
        d_local /= max(1, end - start)
        served = view.read([view.row_of[key]])
        torch.testing.assert_close(served["d_global"][0], d_global)
        torch.testing.assert_close(served["d_local"][0], d_local)
        assert torch.equal(served["global_image"][0], table.global_image[row])
        assert int(served["n_objects"][0]) == end - start
        assert served["caption"] == [table.captions[row]]
    # rows are dealt round-robin: chunk c holds the images c, c + 4, c + 8 of the stream
    assert [view.keys[r] for r in range(3)] == [keys[0], keys[4], keys[8]]
    assert view.flag_totals["no_objects"] == COUNTS.count(0)
    # rows from several chunks, scattered (whole-chunk buffer) and contiguous (get_slice), in the order asked
    rows = [10, 0, 5, 1, 2, 9]
    assert view.read(rows)["caption"] == [view.read([r])["caption"][0] for r in rows]


@pytest.mark.parametrize(
    ("w_global", "w_local", "empty_local"),
    [
        (1.0, 1.0, "global"),
        (1.0, 1.0, "zero"),
        (1.0, 0.0, "global"),
        (0.0, 1.0, "zero"),
        (0.3, 2.0, "global"),
    ],
)
def test_d_from_the_streamed_view_equals_d_from_every_object_embedding(
    tmp_path, w_global, w_local, empty_local
) -> None:
    cache, keys = synthetic_cache(tmp_path, COUNTS)
    view = build_view(cache, keys, chunk_rows=4)
    table, _ = cache.load(keys)
    model = ItemDetector(feature_dim=DIM, w_global=w_global, w_local=w_local, empty_local=empty_local)
    streamed = model.distance(view.read([view.row_of[k] for k in keys]))
    in_memory = model.distance(table.batch([table.key_index[k] for k in keys]))
    torch.testing.assert_close(streamed, in_memory, atol=1e-6, rtol=1e-5)


def test_a_change_of_entries_builds_another_view_and_the_same_entries_reuse_it(tmp_path, monkeypatch) -> None:
    cache, keys = synthetic_cache(tmp_path, COUNTS)
    builds = []
    write = view_module._write_view
    monkeypatch.setattr(view_module, "_write_view", lambda *a: builds.append(1) or write(*a))
    first = build_view(cache, keys[:-1], chunk_rows=4)
    assert build_view(cache, list(reversed(keys[:-1])) + keys[:2], chunk_rows=4).dir == first.dir
    assert len(builds) == 1  # the same set of entries, in another order and with repeats: the same view
    grown = build_view(cache, keys, chunk_rows=4)
    assert len(builds) == 2 and grown.dir != first.dir and keys[-1] in grown.row_of
    assert keys[-1] not in first.row_of
    assert build_view(cache, keys, chunk_rows=5).dir != grown.dir  # the chunking is part of the key too
    other = FeatureCache(tmp_path, {"synthetic": 1})  # another frozen stage
    assert view_key(other.key, keys, 4) != view_key(cache.key, keys, 4)
    assert build_view(cache, [*keys, "absent"], chunk_rows=4) is None  # an entry without features: no view


class Killed(BaseException):
    pass


def test_an_interrupted_build_is_never_trusted_and_the_next_build_starts_over(tmp_path, monkeypatch) -> None:
    cache, keys = synthetic_cache(tmp_path, COUNTS)
    write = view_module.write_bytes

    def write_then_die(path, data):
        write(path, data)
        raise Killed  # the process dies between two files

    with monkeypatch.context() as patch:
        patch.setattr(view_module, "write_bytes", write_then_die)
        patch.setattr(view_module.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
        with pytest.raises(Killed):
            build_view(cache, keys, chunk_rows=3)
    directory = cache.dir / "views" / view_key(cache.key, keys, 3)[:16]
    assert (directory / "chunk-00000.safetensors").is_file() and not (directory / "view.json").exists()
    assert open_view(directory, view_key(cache.key, keys, 3)) is None
    view = build_view(cache, keys, chunk_rows=3)
    assert view.dir == directory and not (directory / "staging").exists() and len(view) == len(keys)
    assert sorted(p.name for p in directory.iterdir()) == [
        *(f"chunk-0000{i}.safetensors" for i in range(4)),
        "view.json",
    ]

    expected = view.read([3])["d_local"]
    chunk = directory / "chunk-00001.safetensors"
    data = bytearray(chunk.read_bytes())
    chunk.write_bytes(bytes(data[:-8]))  # a truncated chunk: the view does not open
    assert open_view(directory, view.key) is None
    data[-3] ^= 0xFF  # one flipped byte of a chunk's data: refused on first read, and rebuilt next time
    chunk.write_bytes(bytes(data))
    reopened = open_view(directory, view.key)
    with pytest.raises(ViewCorruptError, match="checksum mismatch"):
        reopened.read([3])
    assert open_view(directory, view.key) is None
    assert torch.equal(build_view(cache, keys, chunk_rows=3).read([3])["d_local"], expected)


def test_the_chunk_shuffle_is_a_permutation_reproducible_per_seed_and_epoch() -> None:
    groups = [torch.arange(0, 5), torch.arange(5, 8), torch.arange(8, 14), torch.tensor([14, 15])]
    sampler = ChunkSampler(groups, shuffle=True, seed=3, num_replicas=1, rank=0)
    first = list(sampler)
    assert sorted(first) == list(range(16)) and len(sampler) == 16
    assert list(ChunkSampler(groups, shuffle=True, seed=3, num_replicas=1, rank=0)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(16)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(ChunkSampler(groups, shuffle=True, seed=4, num_replicas=1, rank=0)) != first
    # each chunk is read in one go: its indices are consecutive in the order
    owner = {int(i): g for g, group in enumerate(groups) for i in group}
    runs = [owner[i] for k, i in enumerate(first) if k == 0 or owner[first[k - 1]] != owner[i]]
    assert sorted(runs) == [0, 1, 2, 3]
    assert list(ChunkSampler(groups, shuffle=False, num_replicas=1, rank=0)) == list(range(16))
    # two ranks: contiguous blocks of one epoch order, equal lengths (padded), together every index
    ranks = [ChunkSampler(groups, shuffle=True, seed=3, num_replicas=3, rank=r) for r in range(3)]
    blocks = [list(r) for r in ranks]
    assert [len(b) for b in blocks] == [6, 6, 6] and set(itertools.chain(*blocks)) == set(range(16))
    assert list(itertools.chain(*blocks))[:16] == first
    unpadded = [
        list(ChunkSampler(groups, shuffle=False, pad=False, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert list(itertools.chain(*unpadded)) == list(range(16))


def test_the_dataset_serves_each_sample_once_per_epoch_chunk_by_chunk_with_skips(tmp_path) -> None:
    from common.data.samples import Sample

    cache, keys = synthetic_cache(tmp_path, COUNTS)
    view = build_view(cache, keys, chunk_rows=3)
    samples = [Sample(f"/img/{i}.png", i % 2, "gen") for i in range(len(keys) + 1)]
    dataset = FeatureDataset(samples, [*keys, "undecodable"], view, {"undecodable": "truncated"}, ["gen"])
    sampler = dataset.sampler(shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=lambda b: b)
    seen, skipped = [], []
    for batch in loader:
        seen += batch["index"].tolist()
        skipped += batch["skipped"]
        for i, index in enumerate(batch["index"].tolist()):
            assert batch["caption"][i] == view.read([view.row_of[keys[index]]])["caption"][0]
    assert sorted(seen) == list(range(len(keys))) and skipped == [("/img/11.png", "truncated")]
    chunk_of = {i: int(view.chunk_of(dataset.rows[i : i + 1])) for i in range(len(keys))}
    order = [i for i in sampler if i < len(keys)]
    assert sum(chunk_of[a] != chunk_of[b] for a, b in itertools.pairwise(order)) == len(view.chunks) - 1
