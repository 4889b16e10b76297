"""The protoken command end to end: each subcommand on real files, and the option groups that
several commands share (declared once in protoken.cli)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import gemmi
import numpy as np
import pytest

from protoken.cli import COMMANDS, build_parser, main
from protoken.codec import dequantize, features_to_image, quantize, read_image, write_png
from protoken.geometry import sixd
from protoken.structure import read_backbones

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def protein(structures_dir):
    """d1asha_, a 147-residue SCOPe domain."""
    return read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]


def image_of(bb, bit_depth: int | None = 16) -> np.ndarray:
    image = features_to_image(sixd(bb.n, bb.ca, bb.c))
    return image if bit_depth is None else dequantize(quantize(image, bit_depth), np.float64)


def manifest_rows(folder: Path) -> dict[str, dict]:
    with open(folder / "manifest.tsv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh, delimiter="\t") if r["status"] == "ok"}


# --------------------------------------------------------------------------- option groups


def _options(command: str) -> dict[str, dict]:
    """Option string -> (default, choices, type) of a command's parser."""
    parser = build_parser(command)
    return {
        opt: {"default": a.default, "choices": a.choices, "type": a.type}
        for a in parser._actions
        for opt in a.option_strings
    }


@pytest.mark.parametrize(
    ("group", "commands"),
    [
        (("--chains", "--models", "--min-len", "--max-len"), ("convert", "encode", "evaluate")),
        (("--shard",), ("convert", "encode")),
        (("--no-progress",), ("convert", "encode", "decode", "evaluate")),
        (("--backbone", "--format"), ("reconstruct", "decode")),
    ],
)
def test_shared_options_mean_the_same_in_every_command(group, commands):
    first = _options(commands[0])
    for command in commands[1:]:
        options = _options(command)
        for opt in group:
            assert options[opt] == first[opt], (command, opt)
    defaults = {o: first[o]["default"] for o in group}
    if "--chains" in group:  # the README's defaults
        assert defaults == {"--chains": "skip-multi", "--models": "skip-multi",
                            "--min-len": 40, "--max-len": 1024}  # fmt: skip


def test_dmax_is_one_option_whose_default_comes_from_the_images_in_reconstruct():
    convert, reconstruct = _options("convert")["--dmax"], _options("reconstruct")["--dmax"]
    assert convert["type"] is reconstruct["type"] and convert["default"] == 80.0
    assert reconstruct["default"] is None  # convert.json beside the images, else 80


def test_shard_option_parses_and_rejects(capsys):
    args = build_parser("encode").parse_args(["x", "-c", "c", "-o", "o", "--shard", "2/5"])
    assert args.shard == (2, 5)
    for bad in ("5/5", "1-3", "a/b"):
        with pytest.raises(SystemExit):
            build_parser("convert").parse_args(["x", "-o", "o", "--shard", bad])
        assert "I/N" in capsys.readouterr().err


def test_help_lists_every_command_and_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and all(f"  {name} " in out for name in COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0 and out.startswith(f"usage: protoken {name}")
        for action in build_parser(name)._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.option_strings[0] in out, (name, action.dest)


def test_missing_inputs_are_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "nothing-here")
    assert main(["reconstruct", missing, "-o", str(tmp_path / "o")]) == 2
    assert main(["convert", missing, "-o", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("nothing-here") == 2


# --------------------------------------------------------------------------- reconstruct


def test_reconstruct_writes_structures_metrics_and_survives_a_bad_image(tmp_path, converted16):
    rows = manifest_rows(converted16)
    images = tmp_path / "images"
    images.mkdir()
    ids = ["biopython__1A8O", "cathtools__1avyA00", "cathtools__1c56A"]
    for sid in ids:
        os.link(converted16 / rows[sid]["bin"] / f"{sid}.png", images / f"{sid}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = main(
        [
            "reconstruct",
            str(images),
            "--out",
            str(out),
            "--fasta",
            str(converted16 / "fasta"),
            "--reference",
            str(Path(rows[ids[0]]["source"]).parent),
            "--format",
            "cif",
        ]
    )
    assert code == 0  # one image failed and was recorded, the others were written
    with open(out / "failed.tsv", newline="") as fh:
        (failed,) = list(csv.DictReader(fh, delimiter="\t"))
    assert failed["id"] == "broken" and failed["reason"].startswith("not a readable PNG")
    for sid in ids:
        st = gemmi.read_structure(str(out / f"{sid}.cif"))
        assert gemmi.one_letter_code([r.name for r in st[0][0]]) == rows[sid]["sequence"]
    with open(out / "metrics.tsv", newline="") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["id"] for r in sorted(table, key=lambda r: r["id"])] == sorted(ids)
    assert list(table[0])[:7] == [
        "id",
        "length",
        "cb_rmsd",
        "tm_score",
        "lddt",
        "clipped_pairs",
        "mirrored_before_fix",
    ]
    for r in table:
        assert float(r["cb_rmsd"]) < 1e-3 and r["mirror_image"] == "false"
        assert int(r["length"]) == len(rows[r["id"]]["sequence"])
    assert {r["id"]: int(r["clipped_pairs"]) for r in table}["cathtools__1avyA00"] == 30
    assert (out / "summary.json").is_file()


def test_reconstruct_reference_from_a_tar_archive(tmp_path, converted16):
    """``--reference`` takes a proteome tar as it is (no unpacking); the metrics say how much
    of each image was clipped, and the hand's confidence."""
    import tarfile

    rows = manifest_rows(converted16)
    ids = ["biopython__1A8O", "cathtools__1avyA00"]
    images = tmp_path / "images"
    images.mkdir()
    archive = tmp_path / "proteome.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for sid in ids:
            os.link(converted16 / rows[sid]["bin"] / f"{sid}.png", images / f"{sid}.png")
            source = Path(rows[sid]["source"])
            tf.add(source, arcname=f"UP000000/{source.name}")
    out = tmp_path / "out"
    assert main(["reconstruct", str(images), "--out", str(out), "--reference", str(archive)]) == 0
    with open(out / "metrics.tsv", newline="") as fh:
        table = {r["id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert sorted(table) == ids
    for r in table.values():
        assert float(r["cb_rmsd"]) < 1e-3 and r["mirror_image"] == "false"
        assert r["handedness"] == "determined" and float(r["handedness_confidence"]) > 0.5
    assert float(table["cathtools__1avyA00"]["clipped_fraction"]) == pytest.approx(
        30 / 2278, abs=1e-4
    )
    assert float(table["biopython__1A8O"]["clipped_fraction"]) == 0.0
    by_clipped = json.loads((out / "summary.json").read_text())["by_clipped"]
    assert [(b["clipped"], b["proteins"]) for b in by_clipped] == [("none", 1), ("1-10%", 1)]
    # evaluate takes one too (for PNG inputs; tested in test_evaluate)
    parsed = build_parser("evaluate").parse_args(["x.png", "-o", "o", "--reference", "db"])
    assert parsed.reference == "db"


def test_reconstruct_single_fasta_file_and_written_png(tmp_path, protein):
    write_png(tmp_path / "x.png", image_of(protein, None), 16)
    (tmp_path / "x.fasta").write_text(">whatever\n" + protein.sequence + "\n")
    assert main(["reconstruct", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"),
                 "--fasta", str(tmp_path / "x.fasta")]) == 0  # fmt: skip
    st = gemmi.read_structure(str(tmp_path / "o" / "x.pdb"))
    assert gemmi.one_letter_code([r.name for r in st[0][0]]) == protein.sequence
    assert not (tmp_path / "o" / "metrics.tsv").exists()


def test_reconstruct_backbone_writes_five_atoms_per_residue_and_backbone_metrics(
    tmp_path, structures_dir, protein
):
    write_png(
        tmp_path / "foldseek__d1asha_.png",
        features_to_image(sixd(protein.n, protein.ca, protein.c)),
        16,
    )
    ref = structures_dir / "foldseek__d1asha_.pdb"
    out = tmp_path / "out"
    assert main(["reconstruct", str(tmp_path), "--out", str(out), "--backbone",
                 "--reference", str(ref)]) == 0  # fmt: skip
    with open(out / "metrics.tsv", newline="") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert float(row["bb_rmsd"]) < 0.1 and float(row["ca_tm_score"]) > 0.99
    assert float(row["cb_rmsd"]) < 1e-3
    chain = gemmi.read_structure(str(out / "foldseek__d1asha_.pdb"))[0][0]
    assert len(chain) == len(protein)
    assert all([a.name for a in res] == ["N", "CA", "C", "O", "CB"] for res in chain)


# --------------------------------------------------------------------------- encode, decode


def test_encode_and_decode(structures_dir, tmp_path, capsys):
    checkpoint = str(DATA / "old-checkpoint.pt")
    src = [str(structures_dir / n) for n in ("foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb")] + [
        str(structures_dir / "foldseek__1tim.pdb.gz")
    ]
    out = tmp_path / "t.npz"
    assert main(["encode", *src, "-c", checkpoint, "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "encoded 2 proteins (1 input skipped)" in text.out
    assert "multi-chain" in text.err
    dec = tmp_path / "dec"
    assert main(["decode", str(out), "-c", checkpoint, "-o", str(dec), "--no-progress"]) == 0
    png = dec / "foldseek__d1asha_.png"
    assert read_image(png).shape == (3, 147, 147)
    assert __import__("imagecodecs").png_decode(png.read_bytes()).dtype == np.uint16
    st = gemmi.read_structure(str(dec / "foldseek__d1asha_.pdb"))
    residues = list(st[0][0])
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    assert len(residues) == 147 and all(len(r) == 1 and r[0].name == "CB" for r in residues)
    assert "".join(gemmi.find_tabulated_residue(r.name).one_letter_code.upper()
                   for r in residues) == bb.sequence  # fmt: skip


def test_encode_formats_for_language_models(structures_dir, tmp_path, capsys):
    import torch

    from protoken import checkpoint as ckpt_io
    from protoken.codec import CodecSettings
    from protoken.model import ResidueConfig, ResidueVQVAE, config_to_dict

    torch.manual_seed(0)
    cfg = ResidueConfig.preset("residue-tiny")
    ckpt = str(tmp_path / "r.pt")
    state = {"model": ResidueVQVAE(cfg).state_dict(), "model_config": config_to_dict(cfg)}
    ckpt_io.save(ckpt, {**state, "codec": CodecSettings().to_dict()})
    src = [str(structures_dir / n) for n in ("foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb")]
    fasta = tmp_path / "t.fasta"
    assert main(["encode", *src, "-c", ckpt, "--format", "fasta", "-o", str(fasta),
                 "--stages", "1", "--no-progress"]) == 0  # fmt: skip
    assert "1.00 tokens (12.0 bits) per residue" in capsys.readouterr().out
    records = fasta.read_text().splitlines()
    seqs = [read_backbones(s)[0].sequence for s in src]
    assert [len(line.split()) for line in records[1::2]] == [len(q) for q in seqs]
    # every stage: 2 tokens (24 bits) per residue, a FASTA line per stage
    both = tmp_path / "t2.fasta"
    assert main(["encode", *src, "-c", ckpt, "--format", "fasta", "-o", str(both),
                 "--no-progress"]) == 0  # fmt: skip
    assert "2.00 tokens (24.0 bits) per residue" in capsys.readouterr().out
    assert len(both.read_text().splitlines()) == 3 * len(src)
    assert main(["encode", *src, "-c", ckpt, "-o", str(tmp_path / "x.npz"), "--stages", "3",
                 "--no-progress"]) == 2  # fmt: skip
    assert "--stages" in capsys.readouterr().err
    # per-residue tokens round-trip through decode, from npz and from FASTA alike
    npz = tmp_path / "t.npz"
    assert main(["encode", *src, "-c", ckpt, "-o", str(npz), "--no-progress"]) == 0
    assert main(["decode", str(npz), "-c", ckpt, "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    assert (tmp_path / "d" / "kortemme__1CTF_A.pdb").stat().st_size > 0
    assert main(["decode", str(both), "-c", ckpt, "-o", str(tmp_path / "f"), "--no-progress"]) == 0
    assert (tmp_path / "f" / "kortemme__1CTF_A.png").read_bytes() == (
        tmp_path / "d" / "kortemme__1CTF_A.png"
    ).read_bytes()
    # hierarchical tokens have no per-residue order: refused before any work; families must match
    grid = str(DATA / "old-checkpoint.pt")
    capsys.readouterr()
    assert main(["encode", *src, "-c", grid, "--format", "fasta", "-o", str(tmp_path / "g.fa"),
                 "--no-progress"]) == 2  # fmt: skip
    assert "one token per residue" in capsys.readouterr().err
    assert main(["decode", str(npz), "-c", grid, "-o", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "residue tokens" in capsys.readouterr().err


# --------------------------------------------------------------------------- streaming, memory


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> str:
    """A hierarchical (grid) micro model with random weights."""
    import torch

    from helpers import MICRO
    from protoken import checkpoint as ckpt_io
    from protoken.codec import CodecSettings
    from protoken.model import HierarchicalConfig, HierarchicalVQVAE, config_to_dict

    torch.manual_seed(0)
    cfg = HierarchicalConfig.preset("tiny", **MICRO)
    path = str(tmp_path_factory.mktemp("micro") / "best.pt")
    ckpt_io.save(path, {"model": HierarchicalVQVAE(cfg).state_dict(),
                        "model_config": config_to_dict(cfg),
                        "codec": CodecSettings().to_dict()})  # fmt: skip
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory, structures_dir) -> list:
    from helpers import small_images

    return small_images(structures_dir, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def residue_micro(tmp_path_factory) -> str:
    """A per-residue tiny model with random weights (fast: ~8 ms per small protein)."""
    from helpers import random_residue_checkpoint

    return random_residue_checkpoint(tmp_path_factory.mktemp("rmicro") / "best.pt")


def test_encode_memory_does_not_grow_with_the_number_of_proteins(small, residue_micro, tmp_path,
                                                                 capsys):  # fmt: skip
    """2,000 proteins take no more memory than 200: the tokens stream to the file. Held until
    the end (as before), the 1,800 more proteins' Tokens cost ~2 MB here (175 KB each for the
    small preset at L = 256); what may grow is the set of ids written (~100 bytes each)."""
    from helpers import linked_images, peak_python_memory
    from protoken.token_files import load_tokens

    fmt = "npz"  # the writers of every format: test_tokenizer.py
    peaks = {}
    for n in (200, 2000):
        folder = linked_images(small, tmp_path / f"in{n}", n)
        out = tmp_path / f"t{n}.{fmt}"
        argv = ["encode", str(folder), "-c", residue_micro, "-o", str(out), "--no-progress",
                "--batch-size", "32", "--format", fmt]  # fmt: skip
        code, peaks[n] = peak_python_memory(lambda argv=argv: main(argv))
        assert code == 0 and f"encoded {n} proteins" in capsys.readouterr().out
    tokens, held = peak_python_memory(lambda: load_tokens(str(out))[0])
    assert len(tokens) == 2000 and len({t.id for t in tokens}) == 2000
    held_extra = held * (2000 - 200) / 2000  # what the old list of every protein's Tokens held
    ids_extra = 256 * (2000 - 200)  # the set of ids that catches a repeated one, generously
    growth = peaks[2000] - peaks[200]
    assert growth < ids_extra + 0.1 * held_extra, (peaks, held_extra)
    assert held_extra > 2 * (ids_extra + 0.1 * held_extra)  # so holding the tokens would fail


def test_a_failed_or_interrupted_encode_leaves_no_file(small, micro_checkpoint, tmp_path,
                                                       capsys, monkeypatch):  # fmt: skip
    from helpers import linked_images
    from protoken.tokenizer import Tokenizer

    folder = linked_images(small, tmp_path / "in", 40)
    calls = {"n": 0}
    real = Tokenizer.tokens_of

    def failing(self, items):
        calls["n"] += 1
        if calls["n"] == 3:  # after two batches were written
            raise RuntimeError("disk on fire")
        return real(self, items)

    monkeypatch.setattr(Tokenizer, "tokens_of", failing)
    for fmt in ("npz", "fasta"):
        calls["n"] = 0
        out = tmp_path / f"t.{fmt}"
        code = main(["encode", str(folder), "-c", micro_checkpoint, "-o", str(out),
                     "--format", fmt, "--batch-size", "8", "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        if fmt == "fasta":  # refused before any work: a grid tokenizer
            assert code == 2
            continue
        assert code == 1 and "disk on fire" in err and calls["n"] == 3
        assert not out.exists() and not list(tmp_path.glob("t.*tmp*")), list(tmp_path.iterdir())


def test_encode_never_overwrites_and_skips_a_repeated_id(small, micro_checkpoint, tmp_path,
                                                         capsys):  # fmt: skip
    from protoken.token_files import load_tokens

    out = tmp_path / "t.npz"
    out.write_text("user data")
    assert main(["encode", str(small[0]), "-c", micro_checkpoint, "-o", str(out),
                 "--no-progress"]) == 2  # fmt: skip
    assert out.read_text() == "user data" and "exists" in capsys.readouterr().err
    out = tmp_path / "u.npz"
    assert main(["encode", str(small[0]), str(small[0]), "-c", micro_checkpoint, "-o", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr()
    assert "encoded 1 protein (1 input skipped)" in text.out and "duplicate id" in text.err
    assert [t.id for t in load_tokens(str(out))[0]] == [small[0].stem]


# --------------------------------------------------------------------------- what a new user met


def test_a_misspelt_checkpoint_names_the_bundled_tokenizers_and_the_closest(
    structures_dir, tmp_path, capsys
):
    src = str(structures_dir / "foldseek__d1asha_.pdb")
    assert main(["encode", src, "-c", "residu", "-o", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at residu" in err and "bundled: default, residue" in err
    assert "did you mean 'residue'?" in err and len(err.strip().splitlines()) == 1


def test_a_multi_chain_file_names_the_options_in_the_cli_and_the_api(structures_dir, tmp_path,
                                                                     capsys):  # fmt: skip
    """The CLI skipped multi-chain files with no hint of --chains; Tokenizer.encode silently
    returned chain A of them. One policy: skipped, naming the options, in both."""
    from protoken.structure import SkipStructure
    from protoken.tokenizer import Tokenizer

    multi = structures_dir / "foldseek__1tim.pdb.gz"  # two chains
    tok = Tokenizer.load(str(DATA / "old-checkpoint.pt"))
    with pytest.raises(SkipStructure, match=r"multi-chain: 2 protein chains .*--chains split"):
        tok.encode(multi)
    first = tok.encode(multi, chains="first")
    assert first.length == len(read_backbones(multi, chains="first")[0])
    out = tmp_path / "t.npz"
    code = main(["encode", str(multi), str(structures_dir / "foldseek__d1asha_.pdb"), "-c",
                 str(DATA / "old-checkpoint.pt"), "-o", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and "--chains split" in capsys.readouterr().err
    assert "--chains split" in (tmp_path / "t.npz.skipped.tsv").read_text()


def test_fasta_tokens_go_to_standard_output_and_the_summary_to_standard_error(
    small, residue_micro, tmp_path, capsys
):
    """--out - wrote a file named '-'; --out /dev/stdout was refused."""
    for out in ("-", "/dev/stdout"):
        code = main(["encode", *map(str, small), "-c", residue_micro, "--format", "fasta",
                     "--stages", "1", "--out", out, "--no-progress"])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0 and not (Path.cwd() / "-").exists()
        records = captured.out.splitlines()
        assert [r.split()[0] for r in records[::2]] == [f">{Path(p).stem}" for p in small]
        assert all(len(r.split()) == int(h.split("length=")[1])
                   for h, r in zip(records[::2], records[1::2], strict=True))  # fmt: skip
        assert "encoded 3 proteins (0 inputs skipped) into standard output" in captured.err
    code = main(["encode", *map(str, small), "-c", residue_micro, "--out", "-"])
    assert code == 2 and "only --format fasta" in capsys.readouterr().err


def test_decode_reads_npz_fasta_and_parquet_alike(small, residue_micro, tmp_path, capsys):
    """decode read only .npz ('not a token file (ValueError)' for our FASTA and Parquet)."""
    images = {}
    for fmt in ("npz", "fasta", "parquet"):
        tokens = tmp_path / f"t.{fmt}"
        argv = ["encode", *map(str, small), "-c", residue_micro, "--format", fmt, "-o",
                str(tokens), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        out = tmp_path / f"dec-{fmt}"
        argv = ["decode", str(tokens), "-c", residue_micro, "-o", str(out), "--refine", "3",
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        images[fmt] = {p.name: read_image(p) for p in sorted(out.glob("*.png"))}
    assert len(images["npz"]) == 3 and capsys.readouterr().out.count("decoded 3 proteins") == 3
    for fmt in ("fasta", "parquet"):
        assert images[fmt].keys() == images["npz"].keys()
        for name, image in images[fmt].items():
            np.testing.assert_array_equal(image, images["npz"][name])
    # FASTA names no tokenizer: --checkpoint is needed, and said so
    code = main(["decode", str(tmp_path / "t.fasta"), "-o", str(tmp_path / "x")])
    assert code == 2 and "give the one that made it with --checkpoint" in capsys.readouterr().err


def test_decode_finds_the_bundled_tokenizer_the_file_names(structures_dir, tmp_path, capsys):
    tokens = tmp_path / "t.parquet"
    src = str(structures_dir / "kortemme__1CTF_A.pdb")
    assert main(["encode", src, "-c", "residue", "--format", "parquet", "-o", str(tokens),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["decode", str(tokens), "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "decoded 1 protein into" in capsys.readouterr().out
    assert (tmp_path / "d" / "kortemme__1CTF_A.pdb").stat().st_size > 0


def test_refine_applies_to_per_residue_tokenizers_only(structures_dir, tmp_path, capsys):
    tokens = tmp_path / "t.npz"
    src = str(structures_dir / "kortemme__1CTF_A.pdb")
    assert main(["encode", src, "-c", "default", "-o", str(tokens), "--no-progress"]) == 0
    code = main(["decode", str(tokens), "-o", str(tmp_path / "d"), "--refine", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--refine: refine applies to per-residue tokenizers only" in err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    with pytest.raises(SystemExit) as info:
        main(["decode", str(tokens), "-o", str(tmp_path / "d"), "--refine", "-1"])
    assert info.value.code == 2 and "must be at least 0" in capsys.readouterr().err
    assert main(["decode", str(tokens), "-o", str(tmp_path / "d"), "--refine", "0",
                 "--no-progress"]) == 0  # fmt: skip


def test_nothing_encoded_leaves_no_file_at_all(bad_inputs_dir, tmp_path, capsys):
    out = tmp_path / "t.npz"
    code = main(["encode", str(bad_inputs_dir / "empty.pdb"), "-c",
                 str(DATA / "old-checkpoint.pt"), "-o", str(out), "--no-progress"])  # fmt: skip
    assert code == 1 and "nothing encoded" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no token file, no .skipped.tsv
