"""protoken.data.index: which images a converted folder holds (manifest, shard index or one
walk), their md5 split, bin selection, exclusions and the memory-mapped cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from protoken.codec import read_image
from protoken.data import ImageIndex, in_valid_split, read_id_list


def png_files(root: Path) -> list[Path]:
    """All bin PNGs under a converted folder, listed independently of protoken."""
    return sorted(root.glob("bin_*/*.png"))


def rel_key(root: Path, path: str | Path) -> str:
    return Path(path).relative_to(root).as_posix()


def expected_val(keys, frac: float) -> set[str]:
    """The md5 split rule, written out: first 8 digest bytes as a fraction of 2**64."""
    return {k for k in keys if int(hashlib.md5(k.encode()).hexdigest()[:16], 16) / 2**64 < frac}


def keys_of(index: ImageIndex, rows=None) -> list[str]:
    rows = range(len(index)) if rows is None else rows.tolist()
    return [index.key(i) for i in rows]


@pytest.fixture(scope="module")
def without_manifest(converted8, tmp_path_factory) -> Path:
    """converted8's images alone: no manifest, so the index walks the bin folders."""
    copy = tmp_path_factory.mktemp("walk") / "images"
    shutil.copytree(converted8, copy, ignore=shutil.ignore_patterns("manifest*.tsv"))
    return copy


def test_split_is_the_md5_of_the_relative_path_deterministic_and_disjoint(converted8):
    index = ImageIndex.build(converted8)
    keys = [rel_key(converted8, p) for p in png_files(converted8)]
    assert sorted(keys_of(index)) == sorted(keys)
    frac = 0.3
    train, val = index.split_rows("train", frac), index.split_rows("val", frac)
    assert set(keys_of(index, val)) == expected_val(keys, frac)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == index.split_rows("all", frac).tolist()
    assert 0.15 < len(val) / len(keys) < 0.45
    assert np.array_equal(index.split_rows("val", frac), val)  # deterministic
    assert all(in_valid_split(k, frac) for k in keys_of(index, val))
    with pytest.raises(ValueError, match="split"):
        index.split_rows("test", frac)
    with pytest.raises(ValueError, match="valid_frac"):
        index.split_rows("val", 1.5)


def test_the_index_and_split_survive_moving_the_root_and_losing_the_manifest(
    converted8, without_manifest, tmp_path
):
    """The split is keyed by BIN/ID.png: a moved copy, and a folder indexed by a walk because
    it has no manifest, split exactly as the original."""
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(converted8, moved)
    original, copy = ImageIndex.build(converted8), ImageIndex.build(moved)
    walked = ImageIndex.build(without_manifest)
    assert original.source == copy.source == "manifest" and walked.source == "walk"
    assert walked.bins == original.bins and keys_of(walked) == keys_of(original)
    assert not walked.lengths.any()  # a walk does not know the lengths
    val = keys_of(original, original.split_rows("val", 0.4))
    assert val and keys_of(copy, copy.split_rows("val", 0.4)) == val
    assert keys_of(walked, walked.split_rows("val", 0.4)) == val


def test_a_manifest_index_lists_the_manifests_images_with_their_lengths(converted8, tmp_path):
    """Built from the manifest's ok rows, not from the folders: an image added by hand to a bin
    folder is not in it, and every listed image has the length the manifest gives."""
    root = tmp_path / "data"
    shutil.copytree(converted8, root)
    stray = png_files(root)[0]
    shutil.copy(stray, stray.parent / "added_by_hand.png")
    index = ImageIndex.build(root)
    assert "added_by_hand" not in {index.id(i) for i in range(len(index))}
    assert len(index) == len(png_files(root)) - 1
    for i in range(0, len(index), 7):
        assert read_image(index.path(i)).shape[-1] == index.lengths[i] > 0
        assert index.read(i) == Path(index.path(i)).read_bytes()


def test_bin_selection_keeps_exactly_the_chosen_bins_in_length_order(converted8):
    on_disk = {p.parent.name for p in png_files(converted8)}
    index = ImageIndex.build(converted8, skip_bins=["bin_40_64", "bin_961_1024"])
    assert set(index.bins) == on_disk - {"bin_40_64"}
    assert list(index.bins) == sorted(index.bins, key=lambda b: int(b.split("_")[1]))
    assert set(keys_of(index)) == {
        rel_key(converted8, p) for p in png_files(converted8) if p.parent.name != "bin_40_64"
    }
    only = ImageIndex.build(converted8, only_bins=["bin_65_128"])
    assert only.bins == ("bin_65_128",)
    assert len(only) == len(list((converted8 / "bin_65_128").glob("*.png")))


def test_missing_or_empty_folders_and_bad_bin_names_are_clear_errors(tmp_path, converted8):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageIndex.build(tmp_path / "nope")
    (tmp_path / "bin_40_64").mkdir()
    (tmp_path / "bin_40_64" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no PNG image"):
        ImageIndex.build(tmp_path)
    with pytest.raises(ValueError, match="bin folder name"):
        ImageIndex.build(converted8, skip_bins=["65_128"])
    with pytest.raises(ValueError, match="no PNG image in bins bin_1_39"):
        ImageIndex.build(converted8, only_bins=["bin_1_39"])


def test_split_key_regex_keeps_each_group_on_one_side_and_exclusions_leave_both(
    converted8, tmp_path
):
    index = ImageIndex.build(converted8)
    ids = [index.id(i) for i in range(len(index))]
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
    excluded = read_id_list(listed)
    assert excluded == [victim]
    kept = set(index.split_rows("all", 0.3, regex, excluded).tolist())
    assert kept == {i for i in range(len(index)) if group[i] != group[0]}
    kept = set(index.split_rows("all", 0.3, None, excluded).tolist())
    assert kept == set(range(1, len(index)))
    with pytest.raises(ValueError, match="gives no key for image id"):
        index.split_rows("train", 0.3, r"^nomatch_(.*)")


def test_index_cache_is_the_parsed_index_and_follows_the_manifest(tmp_path, converted8):
    """The memory-mapped cache gives the same index as parsing, and a grown manifest is
    parsed again rather than served stale."""
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
    src = root / cols[6] / f"{cols[1]}.png"
    cols[1] = "zz_extra"
    shutil.copy(src, root / cols[6] / "zz_extra.png")
    with open(manifest, "a") as fh:
        fh.write("\t".join(cols) + "\n")
    grown = ImageIndex.build(root)
    assert len(grown) == len(first) + 1 and "zz_extra" in {grown.id(i) for i in range(len(grown))}
    assert len(list((root / ".protoken-index").iterdir())) == 1  # the stale cache is gone
    assert [again.id(i) for i in range(3)] == [first.id(i) for i in range(3)]  # still mapped


def test_oversampling_repeats_the_matching_ids_and_only_those(converted8):
    index = ImageIndex.build(converted8)
    ids = [index.id(i) for i in range(len(index))]
    rows = index.split_rows("all", 0.0)
    target = ids[3]
    out = index.oversampled(rows, {"^" + target + "$": 4, "^nothing$": 9})
    counts = {ids[i]: int((out == i).sum()) for i in rows.tolist()}
    assert counts[target] == 4
    assert all(c == 1 for k, c in counts.items() if k != target)
    assert np.all(np.diff(out) >= 0)  # still ascending: the plan permutes it
    # the first matching rule decides; no rule leaves the rows as they were
    first = index.oversampled(rows, {".": 2, "^" + target + "$": 5})
    assert len(first) == 2 * len(rows)
    assert np.array_equal(index.oversampled(rows, {}), rows)
    with pytest.raises(ValueError, match="bad regex"):
        index.oversampled(rows, {"(": 2})
    with pytest.raises(ValueError, match="must be >= 1"):
        index.oversampled(rows, {".": 0})
