"""Length bins: the reference design's bins of 64 residues, and their names read back."""

from __future__ import annotations

import pytest

from protoken.convert.bins import bin_name, bin_range, is_bin, side_limit

REFERENCE_BINS = ["bin_40_64"] + [f"bin_{lo}_{lo + 63}" for lo in range(65, 1024, 64)]


def test_bins_are_the_reference_designs():
    assert [bin_name(n) for n in (40, 64, 65, 128, 129, 192, 193, 961, 1024)] == [
        "bin_40_64", "bin_40_64", "bin_65_128", "bin_65_128", "bin_129_192", "bin_129_192",
        "bin_193_256", "bin_961_1024", "bin_961_1024",
    ]  # fmt: skip
    assert {bin_name(n) for n in range(40, 1025)} == set(REFERENCE_BINS)
    assert bin_name(12) == "bin_1_39" and bin_name(1030) == "bin_1025_1088"  # extended
    with pytest.raises(ValueError, match="positive"):
        bin_name(0)


def test_every_length_lies_in_the_range_its_bin_name_gives():
    for n in range(1, 2100):
        lo, hi = bin_range(bin_name(n))
        assert lo <= n <= hi and is_bin(bin_name(n))
    assert not is_bin("fasta") and not is_bin("bin_65_128x")
    with pytest.raises(ValueError, match="bin folder name"):
        bin_range("65_128")


def test_side_limit_is_the_default_max_len_or_the_bins_top():
    assert side_limit("bin_65_128") == 1024 and side_limit("bin_1985_2048") == 2048
    assert side_limit("images") is None
