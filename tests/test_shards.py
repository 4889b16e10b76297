"""Sharded datasets: convert --format shards, the shard index, and training reads from shards."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protoken.convert import ConvertOptions, convert
from protoken.data import BatchPlan, ImageIndex, IndexedBatches, decode_image
from protoken.inputs import shard_from_environment
from protoken.shards import ShardWriter, index_files, member_key, parse_size, read_index

REPO = Path(__file__).resolve().parents[1]


def _names(manifest) -> list[str]:
    """~40 single-chain structures of ../shared of mixed lengths (40 to ~450 residues)."""
    from conftest import single_chain_files

    names = single_chain_files(manifest, 40, 450)
    return names[::4]


@pytest.fixture(scope="module")
def both(tmp_path_factory, structures_dir, manifest) -> tuple[Path, Path]:
    """The same real structures converted to loose PNGs and to small shards."""
    files = [str(structures_dir / n) for n in _names(manifest)]
    root = tmp_path_factory.mktemp("shards")
    convert(files, ConvertOptions(out=str(root / "loose")), 2, progress=False)
    convert(files, ConvertOptions(out=str(root / "shards"), format="shards", shard_bytes=300_000),
            2, progress=False)  # fmt: skip
    return root / "loose", root / "shards"


def test_shards_hold_the_same_images_as_loose_files(both):
    loose, shards = both
    a, b = ImageIndex.build(loose), ImageIndex.build(shards)
    assert b.source == "shards" and len(b.shards) > len(b.bins) >= 3  # several shards per bin
    assert len(a) == len(b) >= 30
    assert [a.id(i) for i in range(len(a))] == [b.id(i) for i in range(len(b))]
    assert [a.key(i) for i in range(len(a))] == [b.key(i) for i in range(len(b))]  # same split
    for i in range(len(a)):
        assert a.read(i) == b.read(i)
    # WebDataset layout: KEY.png + KEY.json per sample, one bin per shard, at most the size
    for shard in b.shards:
        path = shards / "shards" / shard
        assert path.stat().st_size <= 300_000 or len(tarfile.open(path).getnames()) == 2
        with tarfile.open(path) as tf:
            names = tf.getnames()
            assert [n.rsplit(".", 1)[1] for n in names] == ["png", "json"] * (len(names) // 2)
            meta = json.load(tf.extractfile(names[1]))
        assert meta["bin"] == shard.split("/")[0] and len(meta["sequence"]) == meta["length"]
        assert names[0] == f"{member_key(meta['id'])}.png"
    # the manifest has one ok row per image, and nothing loose was written
    assert not list(shards.glob("bin_*")) and not (shards / "fasta").exists()


def test_exactly_once_over_two_ranks_by_two_workers_and_resume_mid_epoch(both):
    loose, shards = both
    index = ImageIndex.build(shards)
    plan = BatchPlan(index, index.split_rows("all", 0.0), 3, group_by_bin=True, seed=5)
    m = plan.batches_per_epoch

    def stream(rank, epoch=0, position=0, batches=None):
        ds = IndexedBatches(plan, 4, epoch=epoch, position=position, rank=rank, world_size=2)
        dl = DataLoader(ds, batch_size=None, num_workers=2)
        out = []
        for batch in dl:
            out.append(batch)
            if batches is not None and len(out) == batches:
                break
        return out

    # one epoch over 2 ranks x 2 workers: every image exactly once
    per_rank = (m + 1) // 2
    seen = []
    for rank in (0, 1):
        for b in stream(rank, batches=per_rank):
            if b["epoch"] == 0:
                seen += b["ids"]
    assert sorted(seen) == sorted(index.id(i) for i in range(len(index)))
    # resume mid-epoch: 2 batches per rank, then a new stream from the recorded position
    head = [b["ids"] for r in (0, 1) for b in stream(r, batches=2)]
    ds = IndexedBatches(plan, 4, rank=0, world_size=2)
    epoch, position = ds.position_after(2)
    rest_n = (m - position + 1) // 2
    tail = [b["ids"] for r in (0, 1) for b in stream(r, epoch, position, rest_n)
            if b["epoch"] == epoch]  # fmt: skip
    got = sorted(i for ids in head + tail for i in ids)
    assert got == sorted(index.id(i) for i in range(len(index)))
    # the pixels are those of the loose PNG of the same id
    b = stream(0, batches=1)[0]
    loose_png = next(loose.glob(f"bin_*/{b['ids'][0]}.png")).read_bytes()
    expect = torch.from_numpy(decode_image(loose_png))
    n = expect.shape[-1]
    assert torch.equal(b["image"][0, :, :n, :n], expect) and not b["image"][0, :, n:].any()


def test_shard_window_reads_few_shards_at_a_time_and_each_image_once(both):
    _, shards = both
    index = ImageIndex.build(shards)
    rows = index.split_rows("all", 0.0)
    plain = BatchPlan(index, rows, 3, group_by_bin=True, seed=1)
    windowed = BatchPlan(index, rows, 3, group_by_bin=True, seed=1, shard_window=2)
    assert windowed.batches_per_epoch == plain.batches_per_epoch
    assert plain.shard_windows(0) is None
    n_windows = -(-len(index.shards) // 2)
    firsts = {}
    for epoch in (0, 1):
        windows = windowed.shard_windows(epoch)  # window of each shard, this epoch
        assert sorted(np.bincount(windows).tolist())[-1] == 2 and windows.max() == n_windows - 1
        batches = [windowed.batch(epoch, k) for k in range(windowed.batches_per_epoch)]
        assert sorted(np.concatenate(batches).tolist()) == sorted(rows.tolist())  # each once
        assert all(len(set(index.bin_of[b].tolist())) == 1 for b in batches)  # one bin each
        seen = [windows[index.shard_of[b]] for b in batches]
        # the epoch goes through the windows in order: a batch starts in its window and only
        # runs into later ones where its bin's images of that window run out mid-batch
        first = [int(w[0]) for w in seen]
        assert first == sorted(first) and first[0] == 0
        assert all((np.diff(w) >= 0).all() for w in seen)
        # straddling batches are few: at most one per bin at each window boundary
        straddling = sum(len(set(w.tolist())) > 1 for w in seen)
        assert straddling <= len(index.bins) * (n_windows - 1)
        firsts[epoch] = windows
    assert not np.array_equal(firsts[0], firsts[1])  # other windows in another epoch


def _manifest_sources(out: Path) -> list[str]:
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("manifest") and name.endswith(".tsv") and "retried" not in name:
            with open(out / name, newline="") as fh:
                rows += [r["source"] for r in csv.DictReader(fh, delimiter="\t")]
    return rows


@pytest.mark.parametrize("where", ["before_rename", "after_rename", "after_index"])
def test_killed_run_loses_and_duplicates_nothing(tmp_path, structures_dir, manifest, monkeypatch,
                                                 where):  # fmt: skip
    files = [str(structures_dir / n) for n in _names(manifest)]
    out = tmp_path / "out"
    opts = ConvertOptions(out=str(out), format="shards", shard_bytes=300_000)
    real_commit = ShardWriter._commit
    calls = {"n": 0}

    def dying_commit(self, bin_name):
        calls["n"] += 1
        if calls["n"] < 3:
            return real_commit(self, bin_name)
        if where == "before_rename":
            raise KeyboardInterrupt
        shard = self.open[bin_name]
        if where == "after_rename":  # renamed, not yet in the index
            shard.tar.close()
            shard.tar.fileobj.close()
            os.rename(shard.tmp, os.path.join(self.root, shard.name))
            raise KeyboardInterrupt
        # indexed, manifest rows not written yet
        self.on_commit = lambda items: (_ for _ in ()).throw(KeyboardInterrupt())
        return real_commit(self, bin_name)

    monkeypatch.setattr(ShardWriter, "_commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        convert(files, opts, 2, progress=False)
    monkeypatch.setattr(ShardWriter, "_commit", real_commit)
    convert(files, opts, 2, progress=False)
    clean = tmp_path / "clean"
    convert(files, ConvertOptions(out=str(clean), format="shards"), 2, progress=False)
    a, b = ImageIndex.build(out), ImageIndex.build(clean)
    ids = [a.id(i) for i in range(len(a))]
    assert len(ids) == len(set(ids)), "an image is in two shards"
    assert ids == [b.id(i) for i in range(len(b))]
    assert all(a.read(i) == b.read(i) for i in range(len(a)))
    sources = _manifest_sources(out)
    assert sorted(sources) == sorted(set(sources)) == sorted(_manifest_sources(clean))
    on_disk = {str(p.relative_to(out / "shards")) for p in (out / "shards").glob("bin_*/*")}
    assert on_disk == set(a.shards)  # no temporary or unindexed shard left behind


def test_shard_index_refuses_hostile_rows(tmp_path):
    path = tmp_path / "index.all.tsv"
    head = "shard\tmember\toffset\tsize\tid\tlength\tbin\n"
    path.write_text(head + "../../etc/x.tar\tx.png\t0\t10\tx\t50\tbin_40_64\n")
    with pytest.raises(ValueError, match="unsafe"):
        list(read_index(str(path)))
    path.write_text(head + "bin_40_64/a.tar\tx.png\tzero\t10\tx\t50\tbin_40_64\n")
    with pytest.raises(ValueError, match="malformed"):
        list(read_index(str(path)))
    path.write_text(head + "bin_40_64/a.tar\tx.png\t0\t10\tx\t50\tbin_40_64\npartial")
    assert len(list(read_index(str(path)))) == 1  # a torn last line is not a row
    assert index_files(str(tmp_path)) == []  # indexes live in OUT/shards/


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("64kB") == 64_000 and parse_size("123") == 123
    for bad in ("", "-1", "1XB", "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_shard_auto_from_slurm_array_variables():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}
    assert shard_from_environment(env)[0] == (3, 8)
    env = {"SLURM_ARRAY_TASK_ID": "64", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "64"}
    (shard, how) = shard_from_environment(env)
    assert shard == (63, 64) and "shard 63/64" in how
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "8",
           "SLURM_ARRAY_TASK_STEP": "2"}  # fmt: skip
    assert shard_from_environment(env)[0] == (2, 5)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        shard_from_environment({})
    with pytest.raises(ValueError, match="not in a range array"):
        shard_from_environment({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3",
                                "SLURM_ARRAY_TASK_MIN": "1"})  # fmt: skip


def _readme_sbatch() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("#!/bin/bash\n#SBATCH --job-name=protoken-afdb")
    return text[start : text.index("```", start)]


def test_readme_sbatch_array_script_converts_every_member_once(tmp_path, structures_dir):
    """The README's AFDB job array script, run as SLURM would run its two tasks."""
    from helpers import make_foldcomp_db

    files = sorted(structures_dir.glob("foldseek__d*.pdb"))[:10]
    db = tmp_path / "afdb" / "afdb_swissprot_v4"
    db.parent.mkdir()
    names = make_foldcomp_db(files, db)
    script = tmp_path / "convert.sbatch"
    script.write_text(_readme_sbatch())
    out = tmp_path / "out"
    bindir = Path(sys.executable).parent
    for task in (0, 1):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2",
                   SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="1", SLURM_CPUS_PER_TASK="2",
                   AFDB=str(db), OUT=str(out), PATH=f"{bindir}:{os.environ['PATH']}")  # fmt: skip
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"shard {task}/2" in done.stderr
    index = ImageIndex.build(out)
    assert sorted(index.id(i) for i in range(len(index))) == sorted(names)
    assert len(index_files(str(out))) == 2  # one index per array task


def test_encode_reads_shards_as_the_loose_images(both):
    """protoken encode takes a sharded folder: the same ids and tokens as from loose PNGs."""
    import itertools

    from protoken.archives import find_inputs
    from protoken.shards import ShardImage
    from protoken.tokenizer import Tokenizer

    loose, shards = both
    tok = Tokenizer.from_pretrained("default")
    from_shards = list(itertools.islice(find_inputs([str(shards)]), 6))
    assert all(isinstance(x, ShardImage) for x in from_shards)
    by_id = {p.name[:-4]: str(p) for p in loose.glob("bin_*/*.png")}
    a = list(tok.encode_many(from_shards))
    b = list(tok.encode_many([by_id[x.id] for x in from_shards]))
    assert [t.id for t in a] == [t.id for t in b] == [x.id for x in from_shards]
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(x.levels, y.levels, strict=True))


def test_a_shard_window_holds_at_most_as_many_bins_as_shards(both):
    """Shards hold one length bin each, so a window of G shards holds at most G bins: what
    ``protoken train`` warns about when it is under half the bins."""
    _, shards = both
    index = ImageIndex.build(shards)
    rows = index.split_rows("all", 0.0)
    assert BatchPlan(index, rows, 3, group_by_bin=True, seed=1).bins_per_window() is None
    assert all(len(set(index.bin_of[index.shard_of == s].tolist())) == 1
               for s in range(len(index.shards)))  # fmt: skip
    one = BatchPlan(index, rows, 3, group_by_bin=True, seed=1, shard_window=1)
    assert one.bins_per_window() == 1.0
    n_bins = len(set(index.bin_of[rows].tolist()))
    every = BatchPlan(index, rows, 3, group_by_bin=True, seed=1, shard_window=len(index.shards))
    assert every.bins_per_window() == n_bins
    two = BatchPlan(index, rows, 3, group_by_bin=True, seed=1, shard_window=2)
    assert 1.0 <= two.bins_per_window(0) <= 2.0
