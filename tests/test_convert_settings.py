"""convert.json: recorded once, a rerun with other settings refused naming each difference,
found beside an image, and the one check that a value asked for agrees with the recorded one."""

from __future__ import annotations

import json

import pytest

from protoken.cli import main
from protoken.convert import ConvertOptions, convert, read_settings
from protoken.convert_settings import SETTINGS_FILE, agreed, record_settings, settings_beside


def test_agreed_takes_the_recorded_value_and_refuses_a_contradiction():
    assert agreed({"dmax": 40.0}, "dmax", None, "x") == 40.0  # recorded wins
    assert agreed({"dmax": 40.0}, "dmax", 40, "x") == 40.0  # the same value asked for
    assert agreed({}, "dmax", 20.0, "x") == 20.0 and agreed({}, "dmax", None, "x") is None
    with pytest.raises(ValueError) as info:
        agreed({"bit_depth": 16}, "bit_depth", 8, "the images of /data")
    assert str(info.value) == (
        "the images of /data was converted with bit_depth=16 (convert.json), not bit_depth=8"
    )


def test_a_rerun_with_other_settings_is_refused_naming_each_difference(tmp_path):
    out = str(tmp_path)
    first = ConvertOptions(out=out, dmax=40.0).settings()
    record_settings(out, first)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == first
    record_settings(out, first)  # the same settings: accepted
    other = ConvertOptions(out=out, dmax=20.0, chains="split").settings()
    with pytest.raises(
        ValueError,
        match=r"converted with dmax=40.0, chains=skip-multi; "
        r"refusing to add outputs with dmax=20.0, chains=split",
    ):
        record_settings(out, other)


def test_settings_are_found_beside_an_image_and_a_bad_file_is_one_line(tmp_path):
    image = tmp_path / "out" / "bin_65_128" / "x.png"
    image.parent.mkdir(parents=True)
    assert settings_beside(image) is None
    (tmp_path / "out" / SETTINGS_FILE).write_text('{"dmax": 40.0}')
    assert settings_beside(image) == {"dmax": 40.0}  # the folder above the bin
    (image.parent / SETTINGS_FILE).write_text('{"dmax": 20.0}')
    assert settings_beside(image) == {"dmax": 20.0}  # the image's own folder first
    (image.parent / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"unreadable .*convert\.json") as info:
        settings_beside(image)
    assert "\n" not in str(info.value)
    (image.parent / SETTINGS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        read_settings(image.parent)


def test_settings_are_recorded_and_mixing_is_refused(tmp_path, structures_dir):
    out = tmp_path / "out"
    src = str(structures_dir / "foldseek__d1asha_.pdb")
    convert([src], ConvertOptions(out=str(out), dmax=40.0), workers=1, progress=False)
    assert read_settings(str(out))["dmax"] == 40.0 and read_settings(str(out))["bit_depth"] == 8
    with pytest.raises(ValueError, match="converted with dmax=40.0"):
        convert([src], ConvertOptions(out=str(out)), workers=1, progress=False)
    assert main(["convert", src, "--out", str(out), "--bit-depth", "16", "--dmax", "40"]) == 2
