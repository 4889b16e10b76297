"""protoken.data.batches: batch plans, the rank streams built on them, decoding (exact, and
standardised), padding masks, crops, and unreadable files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protoken.codec import REFERENCE_MEAN, REFERENCE_STD, read_image, standardize
from protoken.data import (
    BatchPlan,
    ImageIndex,
    IndexedBatches,
    Normalization,
    batch_sizes_for_budget,
    bin_range,
    collate_with_padding,
    decode_image,
    ignore_signals,
)
from protoken.data.batches import SPLIT_GAP, SPLIT_MIN_CHAIN, crop_complex, split_chain


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


def one_epoch(index: ImageIndex, batch_size=4, **kw) -> IndexedBatches:
    """A finite stream over every image of ``index``, each once."""
    plan = BatchPlan(index, index.split_rows("all", 0.0), batch_size, True, seed=0)
    return IndexedBatches(plan, 16, num_batches=plan.batches_per_epoch, **kw)


def synthetic_index(sizes: dict[str, int]) -> ImageIndex:
    """An index of ``sizes[bin]`` images per bin, no files: for plans alone."""
    names, bin_of = [], []
    for b, (name, n) in enumerate(sizes.items()):
        names += [f"{name}_{i:05d}".encode() for i in range(n)]
        bin_of += [b] * n
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in names], out=offsets[1:])
    return ImageIndex(root="/nowhere", bins=tuple(sizes), bin_of=np.array(bin_of, np.int16),
                      lengths=np.zeros(len(names), np.int32), names=b"".join(names),
                      offsets=offsets)  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the data path as a DataLoader worker does (one intra-op thread): on a busy 2-core
    machine, 2-thread OpenMP regions in collation wait for descheduled threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fixture", ["converted8", "converted16"])
def test_batches_hold_the_codecs_exact_inverse_of_every_image_once(fixture, request):
    root = request.getfixturevalue(fixture)
    index = ImageIndex.build(root, only_bins=["bin_40_64", "bin_65_128"])
    seen = []
    for batch in one_epoch(index):
        assert batch["image"].dtype == torch.float32
        for i, path in enumerate(batch["paths"]):
            n = int(batch["lengths"][i])
            image = batch["image"][i, :, :n, :n].numpy()
            assert np.array_equal(image, read_image(path))  # bitwise
            assert batch["ids"][i] == Path(path).stem and 40 <= n <= 128
            seen.append(path)
    on_disk = [p for b in ("bin_40_64", "bin_65_128") for p in (root / b).glob("*.png")]
    assert sorted(seen) == sorted(map(str, on_disk))


@pytest.mark.parametrize("fixture", ["converted8", "converted16"])
def test_standardisation_and_its_inverse(fixture, request):
    root = request.getfixturevalue(fixture)
    index = ImageIndex.build(root, only_bins=["bin_65_128"])
    stream = one_epoch(index, normalize="reference")
    assert stream.normalization == Normalization(REFERENCE_MEAN, REFERENCE_STD)
    assert stream.normalization.name == "reference"
    n_images = 0
    for batch in stream:
        for i, path in enumerate(batch["paths"]):
            n = int(batch["lengths"][i])
            x = batch["image"][i, :, :n, :n]
            ref = read_image(path).astype(np.float64)
            assert max_abs_diff(x.numpy(), standardize(ref)) < 2e-6
            assert max_abs_diff(stream.normalization.inverse(x).numpy(), ref) < 2e-6
            n_images += 1
    assert n_images > 10
    custom = one_epoch(index, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = next(iter(custom))  # mean = std = 1/2 maps [-1, 1] onto itself
    n = int(batch["lengths"][0])
    assert max_abs_diff(batch["image"][0, :, :n, :n].numpy(), read_image(batch["paths"][0])) < 1e-6
    assert custom.normalization.name == "custom"
    assert one_epoch(index, normalize="seed").normalization.name == "reference"  # the old name


def test_normalization_options_are_validated(converted8):
    index = ImageIndex.build(converted8, only_bins=["bin_65_128"])
    with pytest.raises(ValueError, match="both"):
        one_epoch(index, mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="normalize"):
        one_epoch(index, normalize="imagenet")
    with pytest.raises(ValueError, match="do not pass them"):
        one_epoch(index, normalize="reference", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="positive"):
        Normalization((0.5,) * 3, (0.5, 0.0, 0.5))
    assert one_epoch(index, normalize="none").normalization is None


# --------------------------------------------------------------------------- collate


@pytest.mark.parametrize("multiple", [1, 2, 64])
def test_collate_pads_to_a_multiple_with_exact_masks(converted16, multiple):
    index = ImageIndex.build(converted16, only_bins=["bin_40_64", "bin_129_192"])
    items = []
    for i in range(0, len(index), 6):
        image = torch.from_numpy(decode_image(index.read(i)))
        items.append({"image": image, "length": image.shape[-1], "id": index.id(i)})
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
    with pytest.raises(ValueError, match="empty"):
        collate_with_padding([], multiple=1)


def test_batches_made_in_dataloader_workers_equal_those_made_in_process(converted8):
    """In workers a batch is built in shared memory, uninitialised: the padding must be zeroed
    and the batches must not depend on where they were made."""
    index = ImageIndex.build(converted8, only_bins=["bin_40_64", "bin_65_128", "bin_129_192"])
    plan = BatchPlan(index, index.split_rows("all", 0.0), 5, group_by_bin=False, seed=2)

    def batches(workers):
        stream = IndexedBatches(plan, 64, num_batches=6)
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            worker_init_fn=ignore_signals)  # fmt: skip
        return list(loader)

    here, there = batches(0), batches(2)
    assert len(here) == len(there) == 6
    for a, b in zip(here, there, strict=True):
        assert a["ids"] == b["ids"] and len(set(a["lengths"].tolist())) > 1  # padded
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert not b["image"][~b["mask"][:, None].expand_as(b["image"])].any()


# --------------------------------------------------------------------------- plans


def test_batch_plan_one_bin_per_batch_every_image_once_per_epoch(converted8):
    index = ImageIndex.build(converted8)
    rows = index.split_rows("train", 0.1)
    plan = BatchPlan(index, rows, 8, True, seed=5)
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
    again = BatchPlan(index, rows, 8, True, seed=5)
    assert [again.batch(1, k).tolist() for k in range(3)] == [
        plan.batch(1, k).tolist() for k in range(3)
    ]


def test_epochs_are_near_uniform_shuffles_that_interleave_the_bins():
    """The order of an epoch is uncorrelated with the index order and with the other epochs,
    and the bins are spread along it (not read one after the other)."""
    index = synthetic_index({"bin_1_39": 1200, "bin_40_64": 800})
    rows = index.split_rows("all", 0.0)

    def order(epoch, seed=0):
        plan = BatchPlan(index, rows, 4, True, seed=seed)
        return np.concatenate([plan.batch(epoch, k) for k in range(plan.batches_per_epoch)])

    e0, e1 = order(0), order(1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == rows.tolist()
    assert np.array_equal(e0, order(0)) and not np.array_equal(e0, order(0, seed=1))
    position = np.empty(len(rows), dtype=np.int64)
    position[e0] = np.arange(len(rows))
    assert abs(spearman(e0, np.arange(len(e0)))) < 0.1  # 1/sqrt(2000) = 0.022
    assert abs(spearman(position[e1], np.arange(len(e1)))) < 0.1
    for half in (e0[: len(e0) // 2], e0[len(e0) // 2 :]):
        assert 0.5 < float(np.mean(index.bin_of[half] == 0)) < 0.7  # 60% of the images


def test_a_batch_size_per_bin_gives_batches_of_that_size():
    sizes = batch_sizes_for_budget(["bin_1_39", "bin_40_64"], pixels=64 * 64 * 7, multiple=64)
    assert sizes == {"bin_1_39": 7, "bin_40_64": 7}
    sizes = batch_sizes_for_budget(["bin_1_39", "bin_40_64"], pixels=40 * 40 * 10, multiple=8)
    assert sizes == {"bin_1_39": 10, "bin_40_64": 3}  # sides 40 and 64: 16000 // 4096
    assert batch_sizes_for_budget(["bin_1_39"], 40 * 40 * 10, 8, max_batch=4) == {"bin_1_39": 4}
    index = synthetic_index({"bin_1_39": 95, "bin_40_64": 31})
    plan = BatchPlan(index, index.split_rows("all", 0.0), sizes, True, seed=0)
    assert plan.batches_per_epoch == 10 + 11
    for k in range(plan.batches_per_epoch):
        rows = plan.batch(0, k)
        (b,) = set(index.bin_of[rows].tolist())
        assert len(rows) == sizes[index.bins[b]] or len(rows) == (5 if b == 0 else 1)
    with pytest.raises(ValueError, match="no entry"):
        BatchPlan(index, index.split_rows("all", 0.0), {"bin_1_39": 2}, True, seed=0)
    with pytest.raises(ValueError, match="group_by_bin"):
        BatchPlan(index, index.split_rows("all", 0.0), sizes, False, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        BatchPlan(index, index.split_rows("all", 0.0), 0, True, seed=0)
    with pytest.raises(ValueError, match="shard_window"):
        BatchPlan(index, index.split_rows("all", 0.0), 2, True, seed=0, shard_window=0)
    with pytest.raises(ValueError, match="no image"):
        BatchPlan(index, np.array([], dtype=np.int64), 2, True, seed=0)


# --------------------------------------------------------------------------- rank streams


def _stream_ids(ds, n, workers=0):
    loader = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=ignore_signals)
    out = []
    for batch in loader:
        out.append((batch["epoch"], batch["position"], tuple(batch["ids"])))
        if len(out) == n:
            break
    return out


def test_stream_is_a_pure_function_of_the_position_whatever_workers_or_world_size(converted8):
    index = ImageIndex.build(converted8, only_bins=["bin_40_64", "bin_65_128"])
    plan = BatchPlan(index, index.split_rows("train", 0.1), 4, True, seed=1)
    m = plan.batches_per_epoch
    start = dict(epoch=3, position=m - 5)  # crosses an epoch boundary
    ranks = [IndexedBatches(plan, 16, rank=r, world_size=2, **start) for r in (0, 1)]
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
    single = _stream_ids(IndexedBatches(plan, 16, epoch=epoch, position=position), 4)
    used = [(e, k) for w in want for e, k, _ in w[:3]] + [(e, k) for e, k, _ in single]
    assert sorted(used) == [(3, m - 5 + j) for j in range(5)] + [(4, j) for j in range(5)]
    with pytest.raises(ValueError, match="rank"):
        IndexedBatches(plan, 16, rank=2, world_size=2)


def test_every_rank_gets_a_batch_at_every_step_and_validation_is_fixed(converted8):
    """Fewer batches than ranks neither starve a rank nor end its stream (the global batches
    run on into the next epoch); a finite stream gives every rank exactly ``num_batches``, the
    same ones at every validation, cycling over a short split."""
    index = ImageIndex.build(converted8, only_bins=["bin_40_64"])
    plan = BatchPlan(index, index.split_rows("all", 0.0)[:1], 4, True, seed=0)  # one image
    assert plan.batches_per_epoch == 1
    for rank in (0, 1):
        got = _stream_ids(IndexedBatches(plan, 16, rank=rank, world_size=2), 3)
        assert [e for e, _, _ in got] == [rank, rank + 2, rank + 4]  # one epoch per step
    val = BatchPlan(index, index.split_rows("val", 0.3), 4, True, seed=0)
    for rank in (0, 1):
        stream = IndexedBatches(val, 16, epoch=-1, num_batches=2 * val.batches_per_epoch + 1,
                                rank=rank, world_size=2)  # fmt: skip
        first, again = list(stream), list(stream)
        assert len(first) == 2 * val.batches_per_epoch + 1
        assert [b["ids"] for b in first] == [b["ids"] for b in again]
        assert {b["epoch"] for b in first} == {-1}


def test_resuming_far_into_a_run_reads_only_the_batch_it_needs(converted8, tmp_path, caplog):
    """O(1) resume: the first batch at epoch 10**6 comes from one plan and its own files (the
    others are deleted here, and nothing misses them)."""
    root = tmp_path / "data"
    shutil.copytree(converted8, root)
    index = ImageIndex.build(root)
    plan = BatchPlan(index, index.split_rows("train", 0.1), 4, True, seed=0)
    wanted = {index.path(j) for j in plan.batch(10**6, 8)}
    for png in root.glob("bin_*/*.png"):
        if str(png) not in wanted:
            png.unlink()
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        batch = next(iter(IndexedBatches(plan, 16, epoch=10**6, position=7, rank=1, world_size=4)))
    assert (batch["epoch"], batch["position"]) == (10**6, 8)
    assert batch["ids"] == [index.id(j) for j in plan.batch(10**6, 8)]
    assert not caplog.records


def test_crops_are_diagonal_windows_fixed_by_the_stream_position(converted8):
    index = ImageIndex.build(converted8)
    rows = index.split_rows("train", 0.1)
    plan = BatchPlan(index, rows, 4, True, seed=3)
    crop = 64

    def take(ds, n=12):
        return [b for _, b in zip(range(n), ds, strict=False)]

    first = take(IndexedBatches(plan, 1, crop=crop))
    again = take(IndexedBatches(plan, 1, crop=crop, position=5))
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
        IndexedBatches(plan, 1, crop=0)


# --------------------------------------------------------------------------- bad files


@pytest.fixture()
def with_corrupt_files(converted8, tmp_path) -> tuple[Path, list[Path]]:
    """Two bins of real images plus a truncated PNG and a non-PNG, without a manifest (the
    index walks the folders and meets them)."""
    root = tmp_path / "root"
    for name in ("bin_40_64", "bin_65_128"):
        shutil.copytree(converted8 / name, root / name)
    data = next((root / "bin_40_64").glob("*.png")).read_bytes()
    bad = [root / "bin_40_64" / "truncated.png", root / "bin_40_64" / "garbage.png"]
    bad[0].write_bytes(data[: len(data) // 2])
    bad[1].write_bytes(b"not a png at all")
    return root, bad


def test_unreadable_images_are_logged_once_and_left_out_of_their_batch(with_corrupt_files,
                                                                        caplog):  # fmt: skip
    root, bad = with_corrupt_files
    index = ImageIndex.build(root)
    good = sorted(str(p) for p in root.glob("bin_*/*.png") if p not in bad)
    plan = BatchPlan(index, index.split_rows("all", 0.0), 3, True, seed=0)
    m = plan.batches_per_epoch
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        batches = _take(IndexedBatches(plan, 16), 2 * m)  # two epochs of one stream
    for epoch in (0, 1):
        got = sorted(p for b in batches if b["epoch"] == epoch for p in b["paths"])
        assert got == good
    for path in bad:  # logged once by the stream, not once per epoch, naming the file
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1
    # in DataLoader workers too, without killing them
    loader = DataLoader(IndexedBatches(plan, 16, num_batches=m), batch_size=None, num_workers=2)
    assert sorted(p for b in loader for p in b["paths"]) == good


def test_a_batch_without_any_readable_image_is_an_error_naming_its_files(tmp_path):
    folder = tmp_path / "data" / "bin_40_64"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"broken")
    index = ImageIndex.build(tmp_path / "data")
    plan = BatchPlan(index, index.split_rows("all", 0.0), 2, True, seed=0)
    with pytest.raises(RuntimeError, match=r"no readable image in batch 0 of epoch 0: .*a\.png"):
        next(iter(IndexedBatches(plan, 16)))


def test_bin_names_read_as_length_ranges():
    assert bin_range("bin_65_128") == (65, 128)
    with pytest.raises(ValueError, match="bin folder name"):
        bin_range("65_128")


def _take(stream, n):
    return [b for _, b in zip(range(n), stream, strict=False)]


# --------------------------------------------------------------------------- complexes


@pytest.fixture(scope="module")
def complex_folder(tmp_path_factory, structures_dir) -> tuple[Path, np.ndarray, tuple]:
    """Haemoglobin (4hhb: four chains, 574 residues) as one complex image in a converted
    folder whose manifest records its chain layout, beside two single chains."""
    from protoken.codec import features_to_image, write_png
    from protoken.geometry import sixd
    from protoken.structure import read_backbones

    root = tmp_path_factory.mktemp("complexes")
    chains = read_backbones(structures_dir / "graphein__4hhb.cif.gz", "split", "first")
    coords = np.concatenate([bb.coords for bb in chains])
    image = features_to_image(sixd(coords[:, 0], coords[:, 1], coords[:, 2]), 80.0)
    sizes = tuple(len(bb) for bb in chains)
    rows = [("4hhb", "bin_513_576", len(coords), ",".join(f"{bb.chain_id}:{len(bb)}"
                                                           for bb in chains))]  # fmt: skip
    (root / "bin_513_576").mkdir()
    write_png(str(root / "bin_513_576" / "4hhb.png"), image, bit_depth=16)
    for bb in chains[:2]:
        single = features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)
        (root / "bin_129_192").mkdir(exist_ok=True)
        write_png(str(root / "bin_129_192" / f"{bb.id}.png"), single, bit_depth=16)
        rows.append((bb.id, "bin_129_192", len(bb), f"{bb.chain_id}:{len(bb)}"))
    header = "source\tid\tstatus\treason\tlength\tdropped\tbin\tsequence\tchains\n"
    body = "".join(f"x\t{i}\tok\t\t{n}\t0\t{b}\tA\t{c}\n" for i, b, n, c in rows)
    (root / "manifest.tsv").write_text(header + body)
    return root, image, sizes


def test_a_complex_crop_keeps_each_chain_in_order_around_its_interface(complex_folder):
    _, image, sizes = complex_folder
    for seed in range(5):
        crop, chains, rows = crop_complex(image, sizes, 128, np.random.default_rng(seed))
        assert crop.shape == (3, 128, 128) and len(chains) == len(rows) == 128
        np.testing.assert_array_equal(crop, image[:, rows][:, :, rows])  # every pixel kept
        assert (np.diff(chains) >= 0).all() and set(chains.tolist()) == set(range(len(sizes)))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        d = np.where(np.tri(len(image[0]), k=-1, dtype=bool), image[0], image[0].T)
        for c in range(len(sizes)):
            mine = rows[chains == c]
            assert (np.diff(mine) == 1).all()  # one contiguous window per chain
            assert abs(len(mine) - 128 * sizes[c] / sum(sizes)) <= 1  # its share
            other = (np.arange(len(d)) < starts[c]) | (np.arange(len(d)) >= starts[c + 1])
            nearest = starts[c] + np.argmin(d[starts[c] : starts[c + 1]][:, other].min(1))
            assert mine[0] <= nearest <= mine[-1]  # the interface is in view


def test_batches_of_complexes_carry_their_chains(complex_folder):
    root, image, sizes = complex_folder
    index = ImageIndex.build(root)
    row = [index.id(i) for i in range(len(index))].index("4hhb")
    assert index.chain_lengths(row) == sizes
    assert all(index.chain_lengths(i) is None for i in range(len(index)) if i != row)
    plan = BatchPlan(index, np.arange(len(index)), batch_size=3, group_by_bin=False, seed=0)
    batch = next(iter(IndexedBatches(plan, 1, num_batches=1, crop=100)))
    k = batch["ids"].index("4hhb")
    chains = batch["chains"]
    assert chains.shape == (3, 100) and set(chains[k].tolist()) == set(range(4))
    for i, n in enumerate(batch["lengths"].tolist()):
        assert (chains[i, n:] == -1).all()
        if i != k:
            assert (chains[i, :n] == 0).all()  # single chains: chain 0
    assert ImageIndex.build(root).chain_lengths(row) == sizes  # from the cache too


# --------------------------------------------------------------------------- pseudo-complexes


def test_a_split_chain_is_the_image_of_its_two_pieces_as_a_complex(structures_dir):
    from protoken.codec import features_to_image
    from protoken.geometry import sixd
    from protoken.structure import read_backbones

    (bb,) = read_backbones(structures_dir / "graphein__4hhb.cif.gz", "first", "first")
    image = features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)
    seen = set()
    for seed in range(20):
        split, chains = split_chain(image, np.random.default_rng(seed))
        c = int(np.argmax(chains))  # where the second piece starts
        g = len(bb) - len(chains)  # residues left out
        seen.add((c, g))
        assert (chains[:c] == 0).all() and (chains[c:] == 1).all()
        assert c >= SPLIT_MIN_CHAIN and len(chains) - c >= SPLIT_MIN_CHAIN
        assert SPLIT_GAP[0] <= g <= SPLIT_GAP[1]
        # the image of the pieces, computed from their atoms, as one two-chain image
        keep = np.r_[0:c, c + g : len(bb)]
        pieces = features_to_image(sixd(bb.n[keep], bb.ca[keep], bb.c[keep]), 80.0)
        np.testing.assert_allclose(split, pieces, atol=1e-5)
    assert len(seen) > 15  # cut and gap drawn, not fixed
    short = image[:, :64, :64]  # under 2 x 30 + 5 residues: left whole
    same, none = split_chain(short, np.random.default_rng(0))
    assert none is None and same is short


def test_a_chain_split_in_up_to_four_pieces_is_the_image_of_those_pieces(structures_dir):
    from protoken.codec import features_to_image
    from protoken.geometry import sixd
    from protoken.structure import read_backbones

    (bb,) = read_backbones(structures_dir / "graphein__4hhb.cif.gz", "first", "first")
    image = features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)
    n = len(bb)
    # pixel (a, b) of channel 0 says which residues it joins: the kept residues can be read
    labelled = np.stack([np.add.outer(np.arange(n) * 10_000.0, np.arange(n))] * 3)
    counts = []
    for seed in range(30):
        split, chains = split_chain(image, np.random.default_rng(seed), pieces=4)
        marks, chains2 = split_chain(labelled, np.random.default_rng(seed), pieces=4)
        assert (chains == chains2).all()
        keep = (marks[0, :, 0] // 10_000).astype(int)
        np.testing.assert_array_equal(marks[0, 0], keep)  # rows and columns: the same residues
        sizes = np.bincount(chains)
        counts.append(len(sizes))
        assert (np.diff(chains) >= 0).all() and (np.diff(chains) <= 1).all()  # pieces in order
        assert sizes.min() >= SPLIT_MIN_CHAIN and (np.diff(keep) > 0).all()
        assert (np.diff(keep)[np.diff(chains) == 0] == 1).all()  # a piece is a stretch
        # between pieces, a gap of SPLIT_GAP residues, so no new chain end is bonded
        gaps = np.diff(keep)[np.diff(chains) == 1] - 1
        assert ((SPLIT_GAP[0] <= gaps) & (gaps <= SPLIT_GAP[1])).all(), gaps
        pieces = features_to_image(sixd(bb.n[keep], bb.ca[keep], bb.c[keep]), 80.0)
        np.testing.assert_allclose(split, pieces, atol=1e-5)
    assert set(counts) == {2, 3}  # drawn; 141 residues rarely hold 4 pieces of 30 and 3 gaps
    wide = np.zeros((3, 400, 400))
    drawn = {len(np.bincount(split_chain(wide, np.random.default_rng(s), pieces=4)[1]))
             for s in range(30)}  # fmt: skip
    assert drawn == {2, 3, 4}
    # two pieces draw exactly what split_chain drew before `pieces` existed (a gap, then a cut),
    # so runs resumed across the change see the same pseudo-complexes
    for seed in range(5):
        rng = np.random.default_rng(seed)
        g = min(int(rng.integers(SPLIT_GAP[0], SPLIT_GAP[1] + 1)), n - 2 * SPLIT_MIN_CHAIN)
        c = int(rng.integers(SPLIT_MIN_CHAIN, n - g - SPLIT_MIN_CHAIN + 1))
        keep = np.r_[0:c, c + g : n]
        b, ib = split_chain(image, np.random.default_rng(seed), pieces=2)
        np.testing.assert_array_equal(ib, np.arange(len(keep)) >= c)
        np.testing.assert_array_equal(b, image[:, keep][:, :, keep])
    with pytest.raises(ValueError, match="pieces must be >= 2"):
        split_chain(image, np.random.default_rng(0), pieces=1)


def test_split_chains_makes_that_fraction_of_single_chains_two_chain_complexes(converted8):
    index = ImageIndex.build(converted8)
    plan = BatchPlan(index, index.split_rows("train", 0.0), 4, True, seed=3)

    def layouts(frac, position=0, n=30):
        out = []
        for b in _take(IndexedBatches(plan, 1, crop=160, split_chains=frac, position=position), n):
            chains = b.get("chains", torch.zeros_like(b["image"][:, 0, 0], dtype=torch.long))
            for i, n_res in enumerate(b["lengths"].tolist()):
                out.append((b["ids"][i], n_res, tuple(chains[i, :n_res].tolist())))
        return out

    none, all_, half = layouts(0.0), layouts(1.0), layouts(0.5)
    assert all(set(c) == {0} for _, _, c in none)
    long_enough = [(n, c) for _, n, c in all_ if n >= 2 * SPLIT_MIN_CHAIN + SPLIT_GAP[1]]
    assert long_enough and all(set(c) == {0, 1} for _, c in long_enough)
    assert all(n <= 160 for _, n, _ in all_)
    split = np.mean([len(set(c)) == 2 for _, n, c in half if n >= 80])
    assert 0.3 < split < 0.7, split
    # a pure function of the stream position: resuming gives the same pseudo-complexes
    again = layouts(0.5, position=5, n=25)
    assert again == half[-len(again) :]
