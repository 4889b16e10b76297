"""Streaming datasets: decoding, md5 split, sharding over ranks and workers, shuffle quality,
padding masks, length-aware batching, infinite streams, and corrupt files."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protoken import data as pd
from protoken.codec import SEED_MEAN, SEED_STD, read_image, standardize, write_png
from protoken.data import (
    IterableBinnedImageDataset,
    IterableImageDataset,
    Normalization,
    batch_sizes_for_budget,
    bin_range,
    buffered_shuffle,
    collate_with_padding,
    cycle,
    take_batches,
)

# --------------------------------------------------------------------------- helpers


def png_files(root: Path) -> list[Path]:
    """All bin PNGs under a converted folder, listed independently of protoken."""
    return sorted(p for p in root.glob("bin_*/*.png"))


def rel_key(root: Path, path: str | Path) -> str:
    return Path(path).relative_to(root).as_posix()


def expected_val(keys, frac: float) -> set[str]:
    """The md5 split rule, written out: first 8 digest bytes as a fraction of 2**64."""
    return {k for k in keys if int(hashlib.md5(k.encode()).hexdigest()[:16], 16) / 2**64 < frac}


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


def paths_of(items) -> list[str]:
    return [it["path"] for it in items]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the data path as a DataLoader worker does (one intra-op thread): on a busy 2-core
    machine, 2-thread OpenMP regions in collation wait for descheduled threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """2000 small random images in two bins (1200 in bin_1_39, 800 in bin_40_64), cheap to
    decode: enough files for order statistics."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name, n, lo, hi in (("bin_1_39", 1200, 8, 39), ("bin_40_64", 800, 40, 44)):
        (root / name).mkdir()
        for i in range(n):
            length = int(rng.integers(lo, hi + 1))
            image = rng.uniform(-1, 1, (3, length, length))
            write_png(root / name / f"t{i:05d}.png", image, 8)
    return root


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fixture", ["converted8", "converted16"])
def test_items_are_the_codecs_exact_inverse(fixture, request):
    root = request.getfixturevalue(fixture)
    ds = IterableBinnedImageDataset(root, split="all", shuffle_buffer=0, only_bins=["bin_65_128"])
    items = list(ds)
    expected = png_files(root)
    assert sorted(paths_of(items)) == sorted(str(p) for p in expected if "bin_65_128" in str(p))
    for item in items:
        ref = read_image(item["path"])
        assert item["image"].dtype == torch.float32
        assert item["image"].shape == (3, item["length"], item["length"])
        assert np.array_equal(item["image"].numpy(), ref)  # bitwise
        assert item["id"] == Path(item["path"]).stem
        assert 65 <= item["length"] <= 128


@pytest.mark.parametrize("fixture", ["converted8", "converted16"])
def test_standardisation_and_its_inverse(fixture, request):
    root = request.getfixturevalue(fixture)
    ds = IterableBinnedImageDataset(
        root, split="all", shuffle_buffer=0, only_bins=["bin_65_128"], normalize="reference"
    )
    assert ds.normalization == Normalization(SEED_MEAN, SEED_STD)
    assert ds.normalization.name == "reference"
    n = 0
    for item in ds:
        ref = read_image(item["path"]).astype(np.float64)
        x = item["image"]
        assert max_abs_diff(x.numpy(), standardize(ref)) < 2e-6
        assert max_abs_diff(ds.denormalize(x).numpy(), ref) < 2e-6
        n += 1
    assert n > 10
    custom = IterableBinnedImageDataset(
        root,
        split="all",
        shuffle_buffer=0,
        only_bins=["bin_40_64"],
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    item = next(iter(custom))  # mean = std = 1/2 maps [-1, 1] onto itself
    assert max_abs_diff(item["image"].numpy(), read_image(item["path"])) < 1e-6
    assert custom.normalization.name == "custom"


def test_normalization_options_are_validated(converted8):
    with pytest.raises(ValueError, match="both"):
        IterableBinnedImageDataset(converted8, mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="normalize"):
        IterableBinnedImageDataset(converted8, normalize="imagenet")
    with pytest.raises(ValueError, match="positive"):
        Normalization((0.5,) * 3, (0.5, 0.0, 0.5))
    assert IterableBinnedImageDataset(converted8, normalize="none").normalization is None


# --------------------------------------------------------------------------- split


def test_split_is_the_md5_of_the_relative_path_deterministic_and_disjoint(converted8):
    keys = [rel_key(converted8, p) for p in png_files(converted8)]
    frac = 0.3

    def split(name):
        ds = IterableBinnedImageDataset(converted8, split=name, valid_frac=frac, shuffle_buffer=50)
        return [rel_key(converted8, p) for p in paths_of(ds)]

    train, val, every = split("train"), split("val"), split("all")
    assert set(val) == expected_val(keys, frac)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(every) == sorted(keys)
    assert 0.15 < len(val) / len(keys) < 0.45
    assert split("val") == val and split("train") == train  # same seed, same order


def test_split_survives_moving_the_root_and_opening_one_bin(converted8, tmp_path):
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(converted8, moved)

    def val_keys(root, **kw):
        ds = IterableBinnedImageDataset(root, split="val", valid_frac=0.4, shuffle_buffer=0, **kw)
        return {rel_key(root, p) for p in paths_of(ds)}

    assert val_keys(converted8) == val_keys(moved)
    one_bin = IterableImageDataset(moved / "bin_65_128", split="val", valid_frac=0.4)
    assert {rel_key(moved, p) for p in paths_of(one_bin)} == val_keys(
        converted8, only_bins=["bin_65_128"]
    )
    assert val_keys(converted8, only_bins=["bin_65_128"])  # not trivially empty


# --------------------------------------------------------------------------- sharding


def _rank_loader(root, rank, **kw):
    ds = IterableBinnedImageDataset(root, rank=rank, world_size=2, **kw)
    return DataLoader(ds, batch_size=None, num_workers=2)


def test_two_ranks_times_two_workers_read_every_file_exactly_once(converted8):
    keys = sorted(rel_key(converted8, p) for p in png_files(converted8))
    for options in ({"shuffle_buffer": 0}, {"shuffle_buffer": 16, "seed": 3}):
        seen = []
        per_rank = []
        for rank in (0, 1):
            got = [
                rel_key(converted8, it["path"])
                for it in _rank_loader(converted8, rank, split="all", **options)
            ]
            per_rank.append(got)
            seen += got
        assert sorted(seen) == keys  # exactly once overall
        assert all(len(got) > 0.3 * len(keys) for got in per_rank)  # both ranks work


def test_shards_partition_without_processes(tiny_root, monkeypatch):
    """The same property with 3 ranks x 2 fake workers, without starting processes."""
    all_keys = {rel_key(tiny_root, p) for p in png_files(tiny_root)}
    seen = []
    for rank in range(3):
        for worker in range(2):
            info = type("Info", (), {"id": worker, "num_workers": 2})()
            monkeypatch.setattr(pd, "get_worker_info", lambda info=info: info)
            ds = IterableBinnedImageDataset(
                tiny_root, split="all", rank=rank, world_size=3, shuffle_buffer=100
            )
            seen += [rel_key(tiny_root, p) for p in paths_of(ds)]
    assert len(seen) == len(all_keys) and set(seen) == all_keys


def test_rank_defaults_to_torch_distributed(converted8, monkeypatch):
    ds = IterableBinnedImageDataset(converted8)
    assert (ds.rank, ds.world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    ds = IterableBinnedImageDataset(converted8)
    assert (ds.rank, ds.world_size) == (2, 4)
    with pytest.raises(ValueError, match="rank"):
        IterableBinnedImageDataset(converted8, rank=4, world_size=4)


# --------------------------------------------------------------------------- shuffle


def test_shuffle_is_near_uniform_with_a_buffer_of_ten_percent(tiny_root):
    plain = paths_of(IterableBinnedImageDataset(tiny_root, split="all", shuffle_buffer=0))
    position = {p: i for i, p in enumerate(plain)}
    rhos = []
    for seed in range(4):
        ds = IterableBinnedImageDataset(tiny_root, split="all", shuffle_buffer=200, seed=seed)
        order = paths_of(ds)
        assert sorted(order) == sorted(plain)  # a permutation: every file once
        rhos.append(spearman([position[p] for p in order], np.arange(len(order))))
        # the bins are interleaved along the stream, not consumed one after the other
        first_half = order[: len(order) // 2]
        assert 0.5 < sum("bin_1_39" in p for p in first_half) / len(first_half) < 0.7
    assert max(abs(r) for r in rhos) < 0.1, rhos  # 1/sqrt(2000) = 0.022


def test_a_plain_buffer_alone_would_not_pass_the_shuffle_test():
    """Why the datasets hash files into passes: a 10% buffer leaves the order correlated."""
    order = list(buffered_shuffle(range(2000), 200, np.random.default_rng(0)))
    assert sorted(order) == list(range(2000))
    assert spearman(order, np.arange(2000)) > 0.8


def test_buffered_shuffle_holds_at_most_its_size():
    held = {"read": 0, "out": 0, "max": 0}

    def source():
        for i in range(1000):
            held["read"] += 1
            held["max"] = max(held["max"], held["read"] - held["out"])
            yield i

    out = []
    for x in buffered_shuffle(source(), 64, 1):
        held["out"] += 1
        out.append(x)
    assert sorted(out) == list(range(1000))
    assert held["max"] <= 65
    assert list(buffered_shuffle(range(5), 0)) == list(range(5))
    assert sorted(buffered_shuffle(range(5), 100, 0)) == list(range(5))


def test_epochs_reseed_the_shuffle(tiny_root):
    def order(epoch, seed=0):
        ds = IterableImageDataset(
            tiny_root / "bin_1_39", split="all", shuffle_buffer=100, seed=seed
        )
        ds.set_epoch(epoch)
        return paths_of(ds)

    e0, e1 = order(0), order(1)
    assert e0 == order(0)  # deterministic
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert abs(spearman([e0.index(p) for p in e1], np.arange(len(e1)))) < 0.15
    assert order(0, seed=1) != e0


# --------------------------------------------------------------------------- collate


@pytest.mark.parametrize("multiple", [1, 2, 64])
def test_collate_pads_to_a_multiple_with_exact_masks(converted16, multiple):
    ds = IterableBinnedImageDataset(
        converted16, split="all", shuffle_buffer=0, only_bins=["bin_40_64", "bin_129_192"]
    )
    items = list(ds)[::6]
    batch = collate_with_padding(items, multiple=multiple)
    lengths = [it["length"] for it in items]
    side = int(np.ceil(max(lengths) / multiple) * multiple)
    assert side % multiple == 0 and side - max(lengths) < multiple
    assert batch["image"].shape == (len(items), 3, side, side)
    assert batch["mask"].shape == (len(items), side, side) and batch["mask"].dtype == torch.bool
    assert batch["lengths"].dtype == torch.long and batch["lengths"].tolist() == lengths
    assert batch["ids"] == [it["id"] for it in items]
    for i, it in enumerate(items):
        n = it["length"]
        expected = np.zeros((side, side), dtype=bool)
        expected[:n, :n] = True
        assert np.array_equal(batch["mask"][i].numpy(), expected)
        assert torch.equal(batch["image"][i, :, :n, :n], it["image"])
        assert not batch["image"][i][:, ~batch["mask"][i]].any()  # zero padding
    with pytest.raises(ValueError):
        collate_with_padding(items, multiple=0)


def test_collate_works_as_a_dataloader_collate_fn_in_workers(converted8):
    """In workers the batch is built in shared memory, uninitialised: padding must be zeroed."""
    ds = IterableBinnedImageDataset(
        converted8, split="all", shuffle_buffer=0, only_bins=["bin_65_128"]
    )
    items = {it["id"]: it for it in ds}
    collate = partial(collate_with_padding, multiple=64)
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=2))
    assert sorted(i for b in batches for i in b["ids"]) == sorted(items)
    for b in batches:
        ref = collate_with_padding([items[i] for i in b["ids"]], multiple=64)
        assert b["image"].shape[-1] == 128
        assert torch.equal(b["image"], ref["image"]) and torch.equal(b["mask"], ref["mask"])
        assert torch.equal(b["lengths"], ref["lengths"])


# --------------------------------------------------------------------------- length-aware batching


def test_group_by_bin_batches_one_bin_each_and_every_file_once(converted8):
    small = ["bin_40_64", "bin_65_128", "bin_129_192", "bin_193_256"]
    ds = IterableBinnedImageDataset(
        converted8, split="all", only_bins=small, batch_size=4, group_by_bin=True, multiple=64
    )
    batches = list(DataLoader(ds, batch_size=None))
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == sorted(p.stem for p in png_files(converted8) if p.parent.name in small)
    partial_per_bin = {}
    for b in batches:
        bins = {Path(p).parent.name for p in b["paths"]}
        assert len(bins) == 1
        (name,) = bins
        lo, hi = bin_range(name)
        assert all(lo <= n <= hi for n in b["lengths"].tolist())
        assert b["image"].shape[-1] == -(-max(b["lengths"].tolist()) // 64) * 64
        if len(b["ids"]) < 4:
            partial_per_bin[name] = partial_per_bin.get(name, 0) + 1
    assert all(v == 1 for v in partial_per_bin.values())  # at most one short batch per bin


def test_batch_size_per_bin_and_infinite_batches_are_full(tiny_root):
    sizes = batch_sizes_for_budget(["bin_1_39", "bin_40_64"], pixels=64 * 64 * 7, multiple=64)
    assert sizes == {"bin_1_39": 7, "bin_40_64": 7}
    sizes = batch_sizes_for_budget(["bin_1_39", "bin_40_64"], pixels=40 * 40 * 10, multiple=8)
    assert sizes == {"bin_1_39": 10, "bin_40_64": 3}  # sides 40 and 64: 16000 // 4096
    ds = IterableBinnedImageDataset(
        tiny_root, batch_size=sizes, group_by_bin=True, multiple=8, infinite=True, shuffle_buffer=50
    )
    for batch, _ in zip(ds, range(300), strict=False):
        name = Path(batch["paths"][0]).parent.name
        assert len(batch["ids"]) == sizes[name]
    with pytest.raises(ValueError, match="no entry"):
        IterableBinnedImageDataset(
            tiny_root, batch_size={"bin_1_39": 2}, group_by_bin=True, multiple=8
        )
    with pytest.raises(ValueError, match="multiple"):
        IterableBinnedImageDataset(tiny_root, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        IterableBinnedImageDataset(tiny_root, group_by_bin=True)


# --------------------------------------------------------------------------- infinite / eval


def test_infinite_stream_repeats_each_ranks_shard_every_epoch(converted8):
    kw = dict(split="all", only_bins=["bin_40_64", "bin_65_128"], world_size=2, shuffle_buffer=8)
    for rank in (0, 1):
        shard = sorted(paths_of(IterableBinnedImageDataset(converted8, rank=rank, **kw)))
        n = len(shard)
        stream = iter(IterableBinnedImageDataset(converted8, rank=rank, infinite=True, **kw))
        first = [next(stream)["path"] for _ in range(n)]
        second = [next(stream)["path"] for _ in range(n)]
        assert sorted(first) == sorted(second) == shard
        assert first != second  # re-seeded


def test_each_epoch_of_an_infinite_stream_discovers_new_files(converted8, tmp_path):
    folder = tmp_path / "bin_65_128"
    folder.mkdir()
    files = png_files(converted8)
    for p in files[:5]:
        shutil.copy(p, folder / p.name)
    stream = iter(IterableImageDataset(folder, split="all", infinite=True, shuffle_buffer=100))
    first = {next(stream)["id"] for _ in range(5)}
    shutil.copy(files[5], folder / files[5].name)  # written while the stream runs
    second = {next(stream)["id"] for _ in range(6)}
    assert first == {p.stem for p in files[:5]}
    assert second == {p.stem for p in files[:6]}


def test_uneven_and_empty_shards_neither_hang_nor_starve(converted8, tmp_path):
    one = tmp_path / "one" / "bin_65_128"
    one.mkdir(parents=True)
    src = png_files(converted8)[0]
    shutil.copy(src, one / src.name)
    stream = {}
    for rank in (0, 1):
        ds = IterableImageDataset(one, split="all", rank=rank, world_size=2, infinite=True)
        stream[rank] = list(zip(ds, range(5), strict=False))  # an empty shard ends, no spin
    full, empty = sorted(stream.values(), key=len, reverse=True)
    assert len(full) == 5 and empty == []
    empty_rank = next(r for r in stream if not stream[r])
    dl = DataLoader(
        IterableImageDataset(one, split="all", rank=empty_rank, world_size=2, infinite=True),
        batch_size=None,
    )
    with pytest.raises(RuntimeError, match="no batch"):
        next(cycle(dl))
    with pytest.raises(RuntimeError, match="no batch"):
        list(take_batches(dl, 3))


def test_take_batches_gives_exactly_n_batches_on_every_rank(converted8):
    collate = partial(collate_with_padding, multiple=64)
    counts = []
    for rank in (0, 1):
        ds = IterableBinnedImageDataset(
            converted8,
            split="val",
            valid_frac=0.3,
            only_bins=["bin_40_64", "bin_65_128", "bin_129_192"],
            rank=rank,
            world_size=2,
            shuffle_buffer=10,
        )
        dl = DataLoader(ds, batch_size=4, collate_fn=collate)
        counts.append(sum(len(b["ids"]) for b in dl))
        got = list(take_batches(dl, 7))
        assert len(got) == 7
        again = list(take_batches(dl, 7))
        assert [b["ids"] for b in got] == [b["ids"] for b in again]  # same batches every eval
    assert min(counts) < 7 * 4  # some rank had to cycle over its shard
    assert list(take_batches(dl, 0)) == []


def test_cycle_reshuffles_each_pass_of_a_finite_loader(tiny_root):
    ds = IterableImageDataset(tiny_root / "bin_40_64", split="all", shuffle_buffer=100)
    dl = DataLoader(ds, batch_size=None)
    it = cycle(dl)
    n = 800
    first = [next(it)["path"] for _ in range(n)]
    second = [next(it)["path"] for _ in range(n)]
    assert sorted(first) == sorted(second) and first != second
    assert ds.epoch == 1


# --------------------------------------------------------------------------- bad inputs


def _with_corrupt_files(src: Path, dst: Path) -> tuple[Path, list[Path]]:
    for name in ("bin_40_64", "bin_65_128"):
        shutil.copytree(src / name, dst / name)
    good = png_files(dst)
    data = good[0].read_bytes()
    bad = [dst / "bin_40_64" / "truncated.png", dst / "bin_40_64" / "garbage.png"]
    bad[0].write_bytes(data[: len(data) // 2])
    bad[1].write_bytes(b"not a png at all")
    return dst, bad


def test_corrupt_pngs_are_logged_and_skipped(converted8, tmp_path, caplog):
    root, bad = _with_corrupt_files(converted8, tmp_path / "root")
    good = sorted(str(p) for p in png_files(root) if p not in bad)
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        items = list(IterableBinnedImageDataset(root, split="all", shuffle_buffer=10))
    assert sorted(paths_of(items)) == good
    for path in bad:
        assert any(str(path) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        ds = IterableBinnedImageDataset(
            root, split="all", batch_size=3, group_by_bin=True, multiple=64, shuffle_buffer=0
        )
        batches = list(ds)
    assert sorted(p for b in batches for p in b["paths"]) == good
    assert sum(len(b["ids"]) < 3 for b in batches) <= len(ds.bins)  # slots were refilled
    assert len(caplog.records) == 2


def test_corrupt_pngs_do_not_kill_dataloader_workers(converted8, tmp_path):
    root, bad = _with_corrupt_files(converted8, tmp_path / "root")
    ds = IterableBinnedImageDataset(root, split="all", only_bins=["bin_40_64"], shuffle_buffer=0)
    dl = DataLoader(ds, batch_size=None, num_workers=2)
    got = sorted(it["path"] for it in dl)
    assert got == sorted(str(p) for p in png_files(root) if "bin_40_64" in str(p) and p not in bad)


def test_infinite_stream_of_only_corrupt_files_stops(tmp_path):
    folder = tmp_path / "bin_40_64"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"broken")
    assert list(IterableImageDataset(folder, split="all", infinite=True)) == []


def test_missing_or_empty_folders_are_clear_errors(tmp_path, converted8):
    with pytest.raises(FileNotFoundError, match="not found"):
        IterableImageDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        IterableBinnedImageDataset(tmp_path / "nope")
    (tmp_path / "bin_40_64").mkdir()
    (tmp_path / "bin_40_64" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no PNG"):
        IterableImageDataset(tmp_path / "bin_40_64")
    with pytest.raises(ValueError, match="no PNG"):
        IterableBinnedImageDataset(tmp_path)
    with pytest.raises(ValueError, match="no bin_LO_HI"):
        IterableBinnedImageDataset(tmp_path / "bin_40_64")
    with pytest.raises(ValueError, match="bin folder name"):
        IterableBinnedImageDataset(converted8, skip_bins=["65_128"])
    with pytest.raises(ValueError, match="no bin_LO_HI"):
        IterableBinnedImageDataset(converted8, only_bins=["bin_1_39"])
    with pytest.raises(ValueError, match="empty"):
        IterableBinnedImageDataset(converted8, split="val", valid_frac=0.0)
    with pytest.raises(ValueError, match="split"):
        IterableBinnedImageDataset(converted8, split="test")


def test_bin_selection_and_several_roots(converted8, converted16):
    names = {p.parent.name for p in png_files(converted8)}
    ds = IterableBinnedImageDataset(converted8, skip_bins=["bin_40_64", "bin_961_1024"])
    assert set(ds.bins) == names - {"bin_40_64"}
    assert [bin_range(b)[0] for b in ds.bins] == sorted(bin_range(b)[0] for b in ds.bins)
    both = IterableBinnedImageDataset(
        [converted8, converted16], split="all", only_bins=["bin_40_64"], shuffle_buffer=0
    )
    got = paths_of(both)
    assert len(got) == 2 * len([p for p in png_files(converted8) if "bin_40_64" in str(p)])
    assert {os.path.dirname(os.path.dirname(p)) for p in got} == {
        str(converted8),
        str(converted16),
    }


# --------------------------------------------------------------------------- index and sampling


def test_index_from_the_manifest_reads_no_directory_and_matches_the_disk(converted8, monkeypatch):
    calls = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": calls.append(p) or real_scandir(p))
    index = pd.ImageIndex.build(converted8)
    data_reads = [c for c in calls if ".protoken-index" not in str(c)]  # not the index cache
    assert index.source == "manifest" and data_reads == [str(converted8)]  # the root only
    on_disk = {rel_key(converted8, p) for p in png_files(converted8)}
    assert {index.key(i) for i in range(len(index))} == on_disk
    for i in range(0, len(index), 17):
        assert read_image(index.path(i)).shape[-1] == index.lengths[i]
    # evaluation batches come from the index: no directory read at all
    plan = pd.BatchPlan(index, index.split_rows("val", 0.2), 4, True, seed=0)
    calls.clear()
    batches = list(pd.IndexedBatches(plan, 16, epoch=-1, num_batches=5))
    assert calls == [] and len(batches) == 5
    # without a manifest: one walk, the same index
    copy = converted8.parent / "no_manifest"
    if not copy.exists():
        shutil.copytree(converted8, copy, ignore=shutil.ignore_patterns("manifest*.tsv"))
    walked = pd.ImageIndex.build(copy)
    assert walked.source == "walk" and walked.bins == index.bins
    assert [walked.key(i) for i in range(len(walked))] == [index.key(i) for i in range(len(index))]


def test_split_key_regex_keeps_each_group_on_one_side_and_exclusions_leave_both(
    converted8, tmp_path
):
    index = pd.ImageIndex.build(converted8)
    ids = [index.id(i) for i in range(len(index))]
    # default: the streaming datasets' rule, md5 of the relative path
    default = set(index.split_rows("val", 0.3).tolist())
    keys = [index.key(i) for i in range(len(index))]
    assert {keys[i] for i in default} == expected_val(keys, 0.3)
    # keyed by the source collection (the part before "__"): groups never straddle the split
    regex = r"^([a-z0-9_]+?)__"
    val = set(index.split_rows("val", 0.3, regex).tolist())
    train = set(index.split_rows("train", 0.3, regex).tolist())
    assert val.isdisjoint(train) and len(val | train) == len(index)
    group = {i: ids[i].split("__")[0] for i in range(len(index))}
    val_groups = {group[i] for i in val}
    assert val_groups == expected_val(set(group.values()), 0.3)
    assert val_groups.isdisjoint({group[i] for i in train})
    # an excluded id takes its whole group out of both splits
    victim = ids[0]
    listed = tmp_path / "test_ids.txt"
    listed.write_text(f"# held out\n{victim}  a comment\n")
    excluded = pd.read_id_list(listed)
    assert excluded == [victim]
    kept = set(index.split_rows("all", 0.3, regex, excluded).tolist())
    assert kept == {i for i in range(len(index)) if group[i] != group[0]}
    kept = set(index.split_rows("all", 0.3, None, excluded).tolist())
    assert kept == set(range(1, len(index)))
    with pytest.raises(ValueError, match="gives no key for image id"):
        index.split_rows("train", 0.3, r"^nomatch_(.*)")


def test_batch_plan_one_bin_per_batch_every_image_once_per_epoch(converted8):
    index = pd.ImageIndex.build(converted8)
    rows = index.split_rows("train", 0.1)
    plan = pd.BatchPlan(index, rows, 8, True, seed=5)
    orders = []
    for epoch in (0, 1):
        batches = [plan.batch(epoch, k) for k in range(plan.batches_per_epoch)]
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == rows.tolist()  # each training image once
        assert all(len(set(index.bin_of[b].tolist())) == 1 for b in batches)
        short = [b for b in batches if len(b) < 8]
        assert len(short) <= len(index.bins)  # at most the last batch of each bin
        orders.append(flat.tolist())
    assert orders[0] != orders[1]  # re-shuffled each epoch
    again = pd.BatchPlan(index, rows, 8, True, seed=5)
    assert [again.batch(1, k).tolist() for k in range(3)] == [
        plan.batch(1, k).tolist() for k in range(3)
    ]


def _stream_ids(ds, n, workers=0):
    loader = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=pd.ignore_signals)
    out = []
    for batch in loader:
        out.append((batch["epoch"], batch["position"], tuple(batch["ids"])))
        if len(out) == n:
            break
    return out


def test_stream_is_a_pure_function_of_the_position_whatever_workers_or_world_size(converted8):
    index = pd.ImageIndex.build(converted8, only_bins=["bin_40_64", "bin_65_128"])
    plan = pd.BatchPlan(index, index.split_rows("train", 0.1), 4, True, seed=1)
    m = plan.batches_per_epoch
    start = dict(epoch=3, position=m - 5)  # crosses an epoch boundary
    ranks = [pd.IndexedBatches(plan, 16, rank=r, world_size=2, **start) for r in (0, 1)]
    want = [_stream_ids(ds, 6) for ds in ranks]
    assert _stream_ids(ranks[1], 6, workers=2) == want[1]  # workers only split the work
    # rank r's i-th batch is global batch position + 2 i + r of the plan
    for r in (0, 1):
        for i, (epoch, k, ids) in enumerate(want[r]):
            t = m - 5 + 2 * i + r
            assert (epoch, k) == (3 + t // m, t % m)
            assert list(ids) == [index.id(j) for j in plan.batch(epoch, k)]
    # resume after 3 batches per rank with one process: the global sequence goes on
    epoch, position = ranks[0].position_after(3)
    assert (epoch, position) == (4, 1)
    single = _stream_ids(pd.IndexedBatches(plan, 16, epoch=epoch, position=position), 4)
    used = [(e, k) for w in want for e, k, _ in w[:3]] + [(e, k) for e, k, _ in single]
    assert sorted(used) == [(3, m - 5 + j) for j in range(5)] + [(4, j) for j in range(5)]


def test_the_former_dataset_name_still_works():
    assert pd.IterableImageDatasetUni is IterableBinnedImageDataset


def test_resuming_far_into_a_run_decodes_only_the_batch_it_needs(converted8, monkeypatch):
    """O(1) resume: the first batch at epoch 10**6 costs one plan and its own images."""
    index = pd.ImageIndex.build(converted8)
    plan = pd.BatchPlan(index, index.split_rows("train", 0.1), 4, True, seed=0)
    decoded = []
    real = pd.decode_png
    monkeypatch.setattr(pd, "decode_png", lambda b: decoded.append(1) or real(b))
    ds = pd.IndexedBatches(plan, 16, epoch=10**6, position=7, rank=1, world_size=4)
    batch = next(iter(ds))
    assert (batch["epoch"], batch["position"]) == (10**6, 8)
    assert batch["ids"] == [index.id(j) for j in plan.batch(10**6, 8)]
    assert len(decoded) == len(batch["ids"])


def test_crops_are_diagonal_windows_fixed_by_the_stream_position(converted8):
    from protoken.codec import read_image

    index = pd.ImageIndex.build(converted8)
    rows = index.split_rows("train", 0.1)
    plan = pd.BatchPlan(index, rows, 4, True, seed=3)
    crop = 64

    def take(ds, n=12):
        return [b for _, b in zip(range(n), ds, strict=False)]

    first = take(pd.IndexedBatches(plan, 1, crop=crop))
    again = take(pd.IndexedBatches(plan, 1, crop=crop, position=5))
    cropped = 0
    for b in first:
        assert b["image"].shape[-1] <= crop
        for i, path in enumerate(b["paths"]):
            full = read_image(path)
            n = int(b["lengths"][i])
            img = b["image"][i, :, :n, :n].numpy()
            if full.shape[-1] <= crop:
                np.testing.assert_array_equal(img, full)
                continue
            cropped += 1
            # a window (s..s+crop) x (s..s+crop) of the full image
            starts = [s for s in range(full.shape[-1] - crop + 1)
                      if np.array_equal(full[:, s : s + crop, s : s + crop], img)]  # fmt: skip
            assert starts, path
    assert cropped > 0
    # resuming at a position gives the same batches, crops included
    for a, b in zip(first[5:], again, strict=False):
        torch.testing.assert_close(a["image"], b["image"])
    with pytest.raises(ValueError, match="crop"):
        pd.IndexedBatches(plan, 1, crop=0)


def test_index_cache_is_the_parsed_index_and_follows_the_manifest(tmp_path, converted8):
    """The memory-mapped cache gives the same index as parsing, and a grown manifest is
    parsed again rather than served stale."""
    import shutil

    from protoken.data import ImageIndex

    root = tmp_path / "data"
    shutil.copytree(converted8, root)
    first = ImageIndex.build(root)  # parses, writes the cache
    assert list((root / ".protoken-index").iterdir())
    again = ImageIndex.build(root)  # maps the cache
    assert isinstance(again.bin_of, np.memmap)
    assert len(again) == len(first) >= 100 and again.bins == first.bins
    assert [again.id(i) for i in range(len(again))] == [first.id(i) for i in range(len(first))]
    assert np.array_equal(again.lengths, first.lengths)
    for split in ("train", "val"):
        fast = again.split_rows(split, 0.2)  # vectorised over the cached hashes
        by_key = first.split_rows(split, 0.2, exclude_ids=["no-such-id"])  # md5 per image
        assert np.array_equal(fast, by_key) and len(fast) > 0
    # a manifest row appended: a new cache, the new image indexed
    manifest = root / "manifest.tsv"
    row = next(r for r in manifest.read_text().splitlines()[1:] if "\tok\t" in r)
    cols = row.split("\t")
    cols[1] = "zz_extra"
    src = root / cols[6] / f"{row.split(chr(9))[1]}.png"
    shutil.copy(src, root / cols[6] / "zz_extra.png")
    with open(manifest, "a") as fh:
        fh.write("\t".join(cols) + "\n")
    grown = ImageIndex.build(root)
    assert len(grown) == len(first) + 1 and "zz_extra" in {grown.id(i) for i in range(len(grown))}
    assert len(list((root / ".protoken-index").iterdir())) == 1  # the stale cache is gone
    assert [again.id(i) for i in range(3)] == [first.id(i) for i in range(3)]  # still mapped
