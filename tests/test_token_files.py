"""Token files: the npz, FASTA and Parquet formats round-trip and read without protoken; a
malformed file is refused in one line; the writers stream in bounded memory, never overwrite,
and leave nothing complete-looking when they fail or are killed."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from protoken.token_files import (
    WRITERS,
    Tokens,
    chains_text,
    load_tokens,
    load_tokens_fasta,
    read_token_file,
    save_tokens,
    save_tokens_fasta,
    save_tokens_parquet,
)
from protoken.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb",
         "biotite__1aki.pdb"]  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A real (tiny) hierarchical tokenizer: the checkpoint of tests/data."""
    return Tokenizer.load(str(DATA / "old-checkpoint.pt"), device="cpu")


@pytest.fixture(scope="module")
def rtok(tmp_path_factory) -> Tokenizer:
    from helpers import random_residue_checkpoint

    path = random_residue_checkpoint(tmp_path_factory.mktemp("rckpt") / "best.pt")
    return Tokenizer.load(path, device="cpu", batch_size=3)


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


def test_residue_token_files_round_trip_as_npz_fasta_and_parquet(rtok, structures_dir, tmp_path):
    """Every stage and the chain layout survive each format, read back by read_token_file;
    the documented layouts read without protoken (plain numpy, text, pyarrow)."""
    tokens = list(rtok.encode_many([structures_dir / n for n in NAMES]))
    K = rtok.model.n_stages
    assert K > 1 and all(t.stages.shape == (t.length, K) for t in tokens)
    complex_ = Tokens("two_chains", tokens[0].length, tokens[0].sequence, tokens[0].levels,
                      (("H", 100), ("L", tokens[0].length - 100)))  # fmt: skip
    tokens = [*tokens, complex_]
    path = str(tmp_path / "r.npz")
    save_tokens(path, tokens, rtok.meta())
    back, meta = load_tokens(path)
    assert meta["layout"] == "residue" and meta["codebook_size"] == 4096 and meta["stages"] == K
    for a, b in zip(tokens, back, strict=True):
        assert (a.id, a.length, a.sequence, a.chains) == (b.id, b.length, b.sequence, b.chains)
        np.testing.assert_array_equal(a.stages, b.stages)
    z = np.load(path)  # the documented layout, with plain numpy
    assert str(z["format"]) == "protoken-tokens/2" and z["codes"].dtype == np.uint16
    off = z["offsets"]
    np.testing.assert_array_equal(z["codes"][off[1] : off[2]], tokens[1].codes)
    np.testing.assert_array_equal(z[f"codes_stage{K}"][off[1] : off[2]], tokens[1].stages[:, -1])
    c = z["chain_offsets"]
    assert z["chain_ids"][c[-2] : c[-1]].tolist() == ["H", "L"]
    # FASTA: a header, then one line per stage, one integer per residue
    save_tokens_fasta(str(tmp_path / "r.fasta"), tokens)
    lines = (tmp_path / "r.fasta").read_text().splitlines()
    assert len(lines) == (K + 1) * len(tokens)
    for i, t in enumerate(tokens):
        head, *body = lines[i * (K + 1) : (i + 1) * (K + 1)]
        assert head.split()[0] == f">{t.id}" and f"length={t.length}" in head
        assert f"stages={K}" in head and f"chains={chains_text(t.chains)}" in head
        for k, line in enumerate(body):
            values = [int(v) for v in line.split()]
            assert len(values) == len(t.sequence) == t.length and values == t.stages[:, k].tolist()
    assert lines[-K - 1].split()[2] == f"chains=H:100,L:{tokens[0].length - 100}"
    back = load_tokens_fasta(str(tmp_path / "r.fasta"))
    for a, b in zip(tokens, back, strict=True):
        assert (a.id, a.length, a.chains, b.sequence) == (b.id, b.length, b.chains, "")
        np.testing.assert_array_equal(a.stages, b.stages)
    pq = pytest.importorskip("pyarrow.parquet")
    save_tokens_parquet(str(tmp_path / "r.parquet"), tokens, rtok.meta())
    table = pq.read_table(str(tmp_path / "r.parquet"))
    stage_columns = ["tokens"] + [f"tokens_{k}" for k in range(2, K + 1)]
    assert table.column_names == ["id", "sequence", *stage_columns, "length", "chain_ids",
                                  "chain_lengths"]  # fmt: skip
    for t, row in zip(tokens, table.to_pylist(), strict=True):
        assert row["id"] == t.id and row["sequence"] == t.sequence and row["length"] == t.length
        for k, col in enumerate(stage_columns):
            assert row[col] == t.stages[:, k].tolist() and len(row[col]) == len(row["sequence"])
        assert list(zip(row["chain_ids"], row["chain_lengths"], strict=True)) == list(t.chains)
    back, meta = read_token_file(str(tmp_path / "r.parquet"))
    assert meta["stages"] == K and [b.chains for b in back] == [t.chains for t in tokens]
    for a, b in zip(tokens, back, strict=True):
        np.testing.assert_array_equal(a.stages, b.stages)
    with pytest.raises(ValueError, match="per-residue"):
        save_tokens_fasta(str(tmp_path / "g.fasta"), load_tokens(str(DATA / "old-tokens.npz"))[0])


def test_the_first_k_stages_are_tokens_of_their_own(rtok, structures_dir, tmp_path):
    """Truncated tokens (the rate knob) are written, read and decoded as tokens of k stages:
    decoding them equals decoding the full tokens with the tokenizer set to k stages."""
    t = rtok.encode(structures_dir / NAMES[1])
    one = t.first_stages(1)
    assert one.stages.shape == (t.length, 1) and one.n_tokens == t.length
    np.testing.assert_array_equal(one.codes, t.codes)
    save_tokens_fasta(str(tmp_path / "one.fasta"), [one])
    head = (tmp_path / "one.fasta").read_text().splitlines()[0]
    assert "stages=" not in head  # one stage: the format of a single code per residue
    assert load_tokens_fasta(str(tmp_path / "one.fasta"))[0].n_stages == 1
    with pytest.raises(ValueError, match="stages"):
        t.first_stages(t.n_stages + 1)


def test_chain_layouts_that_do_not_add_up_are_refused(tmp_path):
    codes = [np.zeros((50, 1), dtype=np.int64)]
    with pytest.raises(ValueError, match="do not sum"):
        Tokens("x", 50, "", codes, (("A", 20), ("B", 20)))
    (tmp_path / "bad.fasta").write_text(">x length=50 chains=A:20,B:20\n" + "1 " * 50 + "\n")
    with pytest.raises(ValueError) as info:
        read_token_file(str(tmp_path / "bad.fasta"))
    assert str(info.value).startswith(str(tmp_path / "bad.fasta")) and "\n" not in str(info.value)
    (tmp_path / "short.fasta").write_text(">x length=50 stages=2\n" + "1 " * 50 + "\n1 2\n")
    with pytest.raises(ValueError, match="expected 50 codes"):
        read_token_file(str(tmp_path / "short.fasta"))
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a token file"):
        read_token_file(str(tmp_path / "junk.txt"))


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
    codes = np.arange(length, dtype=np.int64) % 4096
    seq = "ACDEFGHIKLMNPQRSTVWY" * (length // 20)
    for i in range(start, start + n):
        yield Tokens(f"p{i:06d}", length, seq, [codes])


@pytest.mark.parametrize("fmt", ["npz", "fasta", "parquet"])
def test_token_writers_memory_does_not_grow_with_the_number_of_proteins(rtok, tmp_path, fmt):
    """10,000 proteins take no more memory than 1,000 in every format (held in a list as
    before, the 9,000 more would cost ~20 MB); the files hold them all, in order."""
    from helpers import peak_python_memory

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
from protoken.token_files import Tokens, open_token_writer
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


def test_numbering_survives_npz_and_parquet_and_is_dropped_when_unknown(rtok, structures_dir,
                                                                          tmp_path):  # fmt: skip
    """Author numbering (insertion codes and negative numbers included) round-trips; a file
    where one protein has none (or an unparseable one) records none, and the others decode
    numbered 1..n."""
    t = rtok.encode(structures_dir / NAMES[1])
    ids = ["-3", "-2", "0A", "0B"] + [str(i) for i in range(1, t.length - 3)]
    numbered = Tokens(t.id, t.length, t.sequence, t.levels, t.chains, tuple(ids))
    save_tokens(str(tmp_path / "n.npz"), [numbered], rtok.meta())
    back = load_tokens(str(tmp_path / "n.npz"))[0][0]
    assert back.res_ids == numbered.res_ids
    with np.load(tmp_path / "n.npz") as z:
        assert z["res_numbers"][:3].tolist() == [-3, -2, 0] and chr(z["res_icodes"][2]) == "A"
    pytest.importorskip("pyarrow")
    save_tokens_parquet(str(tmp_path / "n.parquet"), [numbered], rtok.meta())
    assert read_token_file(str(tmp_path / "n.parquet"))[0][0].res_ids == numbered.res_ids
    odd = Tokens("odd", t.length, t.sequence, t.levels, t.chains, ("1 2",) * t.length)
    save_tokens(str(tmp_path / "m.npz"), [numbered, odd], rtok.meta())
    assert all(b.res_ids == () for b in load_tokens(str(tmp_path / "m.npz"))[0])
    with pytest.raises(ValueError, match="residue ids"):
        Tokens("x", t.length, "", t.levels, (), ("1",))
