"""Tokenizer: decode(encode(x)) is the model's reconstruction; token files; files of older
versions."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MICRO
from protoken import checkpoint as ckpt_io
from protoken.codec import CodecSettings
from protoken.model import HierarchicalConfig, HierarchicalVQVAE, config_to_dict
from protoken.structure import SkipStructure, read_backbones
from protoken.tokenizer import Tokenizer, load_tokens, save_tokens

DATA = Path(__file__).parent / "data"

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb",
         "biotite__1aki.pdb"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, structures_dir) -> str:
    """A micro model whose codebooks were initialised on real images (one training forward)."""
    torch.manual_seed(0)
    cfg = HierarchicalConfig.preset("tiny", **MICRO)
    model = HierarchicalVQVAE(cfg)
    tok = Tokenizer(model, CodecSettings(), device="cpu")
    items = [tok.prepare(structures_dir / n)[0] for n in NAMES]
    x, mask, _ = tok._batch([it.image for it in items])
    model.train()
    model(x, mask)  # data-dependent codebook initialisation
    path = str(tmp_path_factory.mktemp("ckpt") / "best.pt")
    ckpt_io.save(
        path,
        {
            "model": model.state_dict(),
            "model_config": config_to_dict(cfg),
            "codec": CodecSettings().to_dict(),
        },
    )
    return path


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return Tokenizer.from_checkpoint(checkpoint, device="cpu")


def test_decode_of_encode_is_the_models_reconstruction(tok, structures_dir):
    items = [tok.prepare(structures_dir / n)[0] for n in NAMES]
    images = [it.image for it in items]
    levels, decoded = tok.roundtrip(images)
    x, mask, lengths = tok._batch(images)
    with torch.no_grad():
        recon = tok.model(x, mask).recon
    for i, n in enumerate(lengths):
        want = recon[i, :, :n, :n].clamp(-1, 1).numpy()
        np.testing.assert_allclose(decoded[i], want, atol=1e-6)
    # grids are the valid squares: ceil(L / s) a side, coarsest level first
    scales = sorted(tok.config.level_scales, reverse=True)
    for lv, n in zip(levels, lengths, strict=True):
        assert [g.shape for g in lv] == [(math.ceil(n / s),) * 2 for s in scales]
        assert all(g.min() >= 0 and g.max() < tok.config.codebook_size for g in lv)


def test_single_protein_api(tok, structures_dir):
    t = tok.encode(structures_dir / "foldseek__d1asha_.pdb")
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    assert (t.id, t.length, t.sequence) == ("foldseek__d1asha_", 147, bb.sequence)
    image = tok.decode(t)
    assert image.shape == (3, 147, 147) and np.abs(image).max() <= 1
    rec = tok.decode_structure(t)
    assert rec.cb.shape == (147, 3) and np.isfinite(rec.cb).all()


def test_structure_and_its_png_give_the_same_tokens(tok, structures_dir, converted8):
    a = tok.encode(structures_dir / "foldseek__d1asha_.pdb")
    b = tok.encode(converted8 / "bin_129_192" / "foldseek__d1asha_.png")
    for ga, gb in zip(a.levels, b.levels, strict=True):
        np.testing.assert_array_equal(ga, gb)


def test_token_files_round_trip_and_read_with_plain_numpy(tok, structures_dir, tmp_path):
    tokens = list(tok.encode_many([structures_dir / n for n in NAMES]))
    path = str(tmp_path / "t.npz")
    save_tokens(path, tokens, tok.meta())
    back, meta = load_tokens(path)
    assert meta["checkpoint"] == tok.checkpoint and meta["codec"]["dmax"] == 80.0
    for a, b in zip(tokens, back, strict=True):
        assert (a.id, a.length, a.sequence) == (b.id, b.length, b.sequence)
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    # the documented layout, without protoken
    z = np.load(path)
    assert str(z["format"]) == "protoken-tokens/2" and z["level0_codes"].dtype == np.uint16
    assert meta["layout"] == "grid" and tokens[0].layout == "grid"
    i = 2
    n = int(z["lengths"][i])
    k = math.ceil(n / meta["level_scales_coarse_first"][0])
    off = z["level0_offsets"]
    np.testing.assert_array_equal(
        z["level0_codes"][off[i] : off[i + 1]].reshape(k, k), tokens[i].levels[0]
    )


def test_encode_many_streams_batches_and_reports_unusable_inputs(tok, structures_dir,
                                                                 bad_inputs_dir):  # fmt: skip
    tok2 = Tokenizer(tok.model, tok.codec, device="cpu", batch_size=2)
    sources = [structures_dir / "foldseek__1tim.pdb.gz", *(structures_dir / n for n in NAMES),
               bad_inputs_dir / "empty.pdb", structures_dir / "foldseek__d1asha_.pdb"]  # fmt: skip
    errors = []

    def on_error(source, exc):
        errors.append((source, exc))

    tokens = list(tok2.encode_many(sources, min_len=100, on_error=on_error))
    # 1tim: two chains (skip-multi); 1CTF_A and 1avyA00: 68 residues (< 100); empty.pdb: unreadable
    assert [type(e).__name__ for _, e in errors] == ["SkipStructure"] * 3 + ["StructureError"]
    assert [str(s).rsplit("/", 1)[1] for s, _ in errors] == [
        "foldseek__1tim.pdb.gz", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb", "empty.pdb",
    ]  # fmt: skip
    assert [t.id for t in tokens] == ["foldseek__d1asha_", "biotite__1aki", "foldseek__d1asha_"]
    # the same tokens as one protein at a time: batching does not change them
    for t in tokens:
        one = tok.encode(structures_dir / f"{t.id}.pdb")
        for a, b in zip(t.levels, one.levels, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(SkipStructure):  # without on_error an unusable input raises
        list(tok.encode_many(sources))


def test_files_of_the_previous_version_load_and_give_the_same_tokens(structures_dir):
    """A checkpoint, its run config and a token file written by protoken 8c8b70e, when the
    attention width was called ``latent_dim`` (tests/data/make_old_fixtures.py)."""
    tok = Tokenizer.from_checkpoint(str(DATA / "old-checkpoint.pt"), device="cpu")
    old, meta = load_tokens(str(DATA / "old-tokens.npz"))
    assert meta["model_config"]["latent_dim"] == 8 and "attn_dim" not in meta["model_config"]
    assert tok.config.attn_dim == 8
    assert HierarchicalConfig.from_dict(meta["model_config"]) == tok.config
    run_config = json.loads((DATA / "old-run-config.json").read_text())
    assert HierarchicalConfig.preset(run_config["preset"], **run_config["model"]) == tok.config
    # today's code encodes the same structures to the same tokens, and decodes as before
    new = list(tok.encode_many([structures_dir / f"{t.id}.pdb" for t in old]))
    assert [(t.id, t.length, t.sequence) for t in new] == [(t.id, t.length, t.sequence)
                                                          for t in old]  # fmt: skip
    for a, b in zip(old, new, strict=True):
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    np.testing.assert_allclose(tok.decode(old[0]), np.load(DATA / "old-decoded-0.npy"), atol=1e-6)


# --------------------------------------------------------------------------- per-residue layout


@pytest.fixture(scope="module")
def residue_checkpoint(tmp_path_factory) -> str:
    from helpers import random_residue_checkpoint

    return random_residue_checkpoint(tmp_path_factory.mktemp("rckpt") / "best.pt")


@pytest.fixture(scope="module")
def rtok(residue_checkpoint) -> Tokenizer:
    return Tokenizer.from_checkpoint(residue_checkpoint, device="cpu", batch_size=3)


def test_residue_tokens_one_per_residue_decode_like_the_forward_pass(rtok, structures_dir):
    assert rtok.layout == "residue" and rtok.bits_per_token == 12
    items = [rtok.prepare(structures_dir / n)[0] for n in NAMES]
    levels, decoded = rtok.roundtrip([it.image for it in items])
    x, mask, lengths = rtok._batch([it.image for it in items])
    with torch.no_grad():
        recon = rtok.model(x, mask).recon
    for i, n in enumerate(lengths):
        assert levels[i][0].shape == (n,)
        want = recon[i, :, :n, :n].clamp(-1, 1).numpy()
        # batches padded differently: float noise, which the untrained decoder's near-coincident
        # atoms amplify in the angles; distances stay tight
        np.testing.assert_allclose(np.tril(decoded[i][0]), np.tril(want[0]), atol=1e-4)
        np.testing.assert_allclose(decoded[i], want, atol=2e-2)
    t = rtok.encode(structures_dir / "foldseek__d1asha_.pdb")
    assert t.layout == "residue" and t.codes.shape == (147,) and t.n_tokens == 147
    assert len(t.sequence) == 147
    rec = rtok.decode_structure(t)
    assert rec.cb.shape == (147, 3) and np.isfinite(rec.cb).all()
    with pytest.raises(ValueError, match="layout"):
        tok_grid = Tokenizer.from_checkpoint(str(DATA / "old-checkpoint.pt"), device="cpu")
        tok_grid.decode(t)


def test_residue_token_files_round_trip_as_npz_fasta_and_parquet(rtok, structures_dir, tmp_path):
    from protoken.tokenizer import save_tokens_fasta, save_tokens_parquet

    tokens = list(rtok.encode_many([structures_dir / n for n in NAMES]))
    path = str(tmp_path / "r.npz")
    save_tokens(path, tokens, rtok.meta())
    back, meta = load_tokens(path)
    assert meta["layout"] == "residue" and meta["codebook_size"] == 4096
    for a, b in zip(tokens, back, strict=True):
        assert (a.id, a.length, a.sequence) == (b.id, b.length, b.sequence)
        np.testing.assert_array_equal(a.codes, b.codes)
    z = np.load(path)  # the documented layout, with plain numpy
    assert str(z["format"]) == "protoken-tokens/2" and z["codes"].dtype == np.uint16
    off = z["offsets"]
    np.testing.assert_array_equal(z["codes"][off[1] : off[2]], tokens[1].codes)
    # FASTA: one record per protein, one integer per residue, aligned with the sequence
    save_tokens_fasta(str(tmp_path / "r.fasta"), tokens)
    lines = (tmp_path / "r.fasta").read_text().splitlines()
    assert len(lines) == 2 * len(tokens)
    for t, head, body in zip(tokens, lines[::2], lines[1::2], strict=True):
        assert head.split()[0] == f">{t.id}"
        values = [int(v) for v in body.split()]
        assert len(values) == len(t.sequence) == t.length and values == t.codes.tolist()
    pq = pytest.importorskip("pyarrow.parquet")
    save_tokens_parquet(str(tmp_path / "r.parquet"), tokens, rtok.meta())
    table = pq.read_table(str(tmp_path / "r.parquet"))
    assert table.column_names == ["id", "sequence", "tokens", "length"]
    for t, row in zip(tokens, table.to_pylist(), strict=True):
        assert row["id"] == t.id and row["sequence"] == t.sequence and row["length"] == t.length
        assert row["tokens"] == t.codes.tolist() and len(row["tokens"]) == len(row["sequence"])
    with pytest.raises(ValueError, match="per-residue"):
        save_tokens_fasta(str(tmp_path / "g.fasta"), load_tokens(str(DATA / "old-tokens.npz"))[0])


def _rewrite(path, out, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(out, **arrays)
    return str(out)


def test_bad_token_files_are_refused_in_one_line_naming_the_file(rtok, structures_dir, tmp_path):
    tokens = list(rtok.encode_many([structures_dir / n for n in NAMES[:2]]))
    good = str(tmp_path / "good.npz")
    save_tokens(good, tokens, rtok.meta())
    with np.load(good) as z:
        codes, ids, offsets = z["codes"], z["ids"], z["offsets"]
    bad = {
        "out of range": dict(codes=np.where(np.arange(len(codes)) == 3, 60000, codes)),
        "negative": dict(codes=np.where(np.arange(len(codes)) == 3, -5, codes).astype(np.int32)),
        "duplicate ids": dict(ids=np.array([ids[0], ids[0]])),
        "unsafe id": dict(ids=np.array(["../escaped", ids[1]])),
        "short codes": dict(codes=codes[:-1]),
        "offsets": dict(offsets=offsets[::-1].copy()),
        "missing key": dict(sequences=None),
        "meta": dict(meta=np.array("{not json")),
    }
    for what, change in bad.items():
        path = _rewrite(good, tmp_path / f"{what.replace(' ', '_')}.npz", **change)
        with pytest.raises(ValueError) as info:
            load_tokens(path)
        message = str(info.value)
        assert message.startswith(path) and "\n" not in message, (what, message)
    (tmp_path / "random.npz").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a token file"):
        load_tokens(str(tmp_path / "random.npz"))


# --------------------------------------------------------------------------- streamed writers


def _synthetic(n: int, length: int = 200, start: int = 0):
    """n residue-layout Tokens under new ids (one codes array shared: only the writer's own
    memory is measured)."""
    from protoken.tokenizer import Tokens

    codes = np.arange(length, dtype=np.int64) % 4096
    seq = "ACDEFGHIKLMNPQRSTVWY" * (length // 20)
    for i in range(start, start + n):
        yield Tokens(f"p{i:06d}", length, seq, [codes])


@pytest.mark.parametrize("fmt", ["npz", "fasta", "parquet"])
def test_token_writers_memory_does_not_grow_with_the_number_of_proteins(rtok, tmp_path, fmt):
    """10,000 proteins take no more memory than 1,000 in every format (held in a list as
    before, the 9,000 more would cost ~20 MB); the files hold them all, in order."""
    from helpers import peak_python_memory
    from protoken.tokenizer import WRITERS

    if fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")

    def write(n: int) -> str:
        path = str(tmp_path / f"t{n}.{fmt}")
        kwargs = {"row_group": 250} if fmt == "parquet" else {}
        with WRITERS[fmt](path, rtok.meta(), **kwargs) as out:
            for t in _synthetic(n):
                out.add(t)
        return path

    peaks = {n: peak_python_memory(lambda n=n: write(n))[1] for n in (1000, 10000)}
    held = peak_python_memory(lambda: list(_synthetic(9000)) and None)[1]
    held += 9000 * 200 * 8  # each protein its own (L,) int64 codes, as the encoder makes them
    assert peaks[10000] - peaks[1000] < 0.05 * held, (peaks, held)
    path = str(tmp_path / f"t10000.{fmt}")
    if fmt == "npz":
        tokens, meta = load_tokens(path)
        assert [t.id for t in tokens[::4999]] == ["p000000", "p004999", "p009998"]
        assert all(np.array_equal(t.codes, np.arange(200) % 4096) for t in tokens[::997])
        assert meta["layout"] == "residue" and len(tokens) == 10000
    elif fmt == "fasta":
        with open(path) as fh:
            assert sum(1 for line in fh if line.startswith(">")) == 10000
    else:
        table = pq.read_table(path)
        assert table.num_rows == 10000 and table.column("id")[9999].as_py() == "p009999"
        assert pq.ParquetFile(path).metadata.num_row_groups == 40
        assert table.column("tokens")[7].as_py() == (np.arange(200) % 4096).tolist()


@pytest.mark.parametrize("fmt", ["npz", "fasta", "parquet"])
def test_a_failed_write_leaves_nothing_and_an_existing_file_is_kept(rtok, tmp_path, fmt):
    from protoken.tokenizer import WRITERS

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"t.{fmt}"
    with pytest.raises(RuntimeError, match="stop"):
        with WRITERS[fmt](path, rtok.meta()) as out:
            for i, t in enumerate(_synthetic(50)):
                out.add(t)
                if i == 30:
                    raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file
    with pytest.raises(ValueError, match="no tokens"):  # nothing added: no file
        with WRITERS[fmt](path, rtok.meta()):
            pass
    assert list(tmp_path.iterdir()) == []
    path.write_text("user data")
    with pytest.raises(FileExistsError):
        WRITERS[fmt](path, rtok.meta())
    assert path.read_text() == "user data"
    # a file that appears at the name during the write is kept, and so are the tokens
    other = tmp_path / f"u.{fmt}"
    with pytest.raises(FileExistsError, match="kept in"):
        with WRITERS[fmt](other, rtok.meta()) as out:
            for t in _synthetic(5):
                out.add(t)
            other.write_text("appeared")
    assert other.read_text() == "appeared"
    assert [p.name.startswith(f"u.{fmt}.tmp") for p in tmp_path.iterdir()].count(True) == 1


KILLED_WRITER = """
import sys, time
import numpy as np
from protoken.tokenizer import Tokens, open_token_writer
path, fmt = sys.argv[1], sys.argv[2]
meta = {"codebook_size": 4096, "layout": "residue"}
with open_token_writer(path, meta, fmt) as out:
    for i in range(100000):
        out.add(Tokens(f"p{i}", 50, "A" * 50, [np.zeros(50, dtype=np.int64)]))
        if i == 2000:
            print("written", flush=True)
        if i > 2000:
            time.sleep(0.001)
"""


@pytest.mark.parametrize("fmt", ["npz", "fasta", "parquet"])
def test_a_killed_write_leaves_no_complete_looking_file(tmp_path, fmt):
    """kill -9 in the middle of a write: no file of the given name, at most FILE.tmp<pid>,
    which is not a token file."""
    import signal
    import subprocess
    import sys

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"t.{fmt}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), fmt],
                            stdout=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == b"written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(f"t.{fmt}.tmp{proc.pid}") for name in left), left
    if fmt == "npz":  # the spools were anonymous; the archive was not even begun
        assert left == []
