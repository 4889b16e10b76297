"""Input discovery: streamed folder walks, which names are structures, ids and shards."""

from __future__ import annotations

import os
import shutil

import pytest

from protoken.archives import find_inputs
from protoken.inputs import (
    find_images,
    find_structures,
    image_id,
    in_shard,
    is_structure_name,
    parse_shard,
    structure_id,
    walk_files,
)


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def tree(tmp_path):
    """a/1abc.pdb, a/b/2xyz.cif.gz, a/b/3def (no extension), notes.txt, .hidden/4ghi.pdb,
    a/.5jkl.pdb, img/bin_40_64/p1.png, img/fasta/p1.fasta."""
    for rel in ("a/1abc.pdb", "a/b/2xyz.cif.gz", "a/b/3def", "notes.txt", ".hidden/4ghi.pdb",
                "a/.5jkl.pdb", "img/bin_40_64/p1.png", "img/fasta/p1.fasta"):  # fmt: skip
        touch(tmp_path / rel)
    return tmp_path


def rel(paths, root) -> set[str]:
    return {os.path.relpath(p, root) for p in paths}


def test_walk_streams_every_visible_file_and_filters_suffixes(tree):
    walk = walk_files(tree)
    assert next(walk)  # a generator: nothing is listed up front
    assert rel(walk_files(tree), tree) == {
        "a/1abc.pdb", "a/b/2xyz.cif.gz", "a/b/3def", "notes.txt", "img/bin_40_64/p1.png",
        "img/fasta/p1.fasta",
    }  # fmt: skip
    assert rel(walk_files(tree, (".PNG",)), tree) == set()  # suffixes are given lower-case
    assert rel(walk_files(tree, (".png",)), tree) == {"img/bin_40_64/p1.png"}
    assert list(walk_files(tree / "a" / "1abc.pdb")) == [str(tree / "a" / "1abc.pdb")]
    assert list(walk_files(tree / "missing")) == []


def test_structure_names_ids_and_image_ids():
    for name in ("1abc.pdb", "1ABC.CIF", "x.ent.gz", "x.mmcif", "x.bcif.gz", "d1asha_", "x.gz"):
        assert is_structure_name(name), name
    for name in ("notes.txt", "p1.png", "x.fasta", "x.tar.gz"):
        assert not is_structure_name(name), name
    assert structure_id("/x/1abc.cif.gz") == "1abc"
    assert structure_id("pdb1abc.ent.gz") == "pdb1abc"
    assert structure_id("d1asha_") == "d1asha_"
    assert structure_id("AF-P1-F1-model_v4.pdb") == "AF-P1-F1-model_v4"
    assert structure_id("B4DXN4.DomSerf.1.pdb") == "B4DXN4.DomSerf.1"
    assert image_id("/o/bin_40_64/1abc_A.png") == "1abc_A" and image_id("x.PNG") == "x"


def test_find_structures_images_and_either(tree):
    a = str(tree / "a")
    assert rel(find_structures([a]), tree) == {"a/1abc.pdb", "a/b/2xyz.cif.gz", "a/b/3def"}
    # a file named explicitly is always taken, whatever its name
    assert list(find_structures([str(tree / "notes.txt")])) == [str(tree / "notes.txt")]
    assert rel(find_images([str(tree)]), tree) == {"img/bin_40_64/p1.png"}
    # a folder holding PNGs is read as images, any other input as structures
    assert rel(find_inputs([str(tree / "img"), a]), tree) == {
        "img/bin_40_64/p1.png", "a/1abc.pdb", "a/b/2xyz.cif.gz", "a/b/3def",
    }  # fmt: skip
    for find in (find_structures, find_images, find_inputs):
        with pytest.raises(FileNotFoundError, match="missing"):
            list(find(["/definitely/missing"]))


def test_shards_partition_by_id(tmp_path, structures_dir):
    names = sorted(p.name for p in structures_dir.glob("foldseek__*"))[:40]
    for root in ("one", "two/levels"):
        for name in names:
            touch(tmp_path / root / name)
    shards = [set(rel(find_structures([str(tmp_path / "one")], (i, 3)), tmp_path / "one"))
              for i in range(3)]  # fmt: skip
    assert sum(map(len, shards)) == len(names) == len(set.union(*shards)) and all(shards)
    # a pure function of the id (the md5 of the file name without extensions), whatever the root
    moved = set(rel(find_structures([str(tmp_path / "two" / "levels")], (1, 3)),
                    tmp_path / "two" / "levels"))  # fmt: skip
    assert moved == shards[1] == {n for n in names if in_shard(structure_id(n), (1, 3))}
    shutil.rmtree(tmp_path / "two")
    assert all(in_shard("anything", None) for _ in range(3))
    # inputs sharing an id share a shard, in whatever folder and format they are
    for stem in ("1abc", "2xyz", "3def", "4ghi", "5jkl", "6mno"):
        for name in (f"a/{stem}.pdb", f"b/c/{stem}.cif.gz", f"d/{stem}.bcif"):
            touch(tmp_path / "same" / name)
    for i in range(3):
        found = [structure_id(p) for p in find_structures([str(tmp_path / "same")], (i, 3))]
        assert all(found.count(sid) == 3 for sid in found)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "0/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
