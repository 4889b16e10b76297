"""benchmarks/token_probes.py: the probe, the alignment scorer, 3Di tokens and the figures, on
tiny inputs with known answers and on real structures of ../shared."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "token_probes", REPO / "benchmarks" / "token_probes.py"
)
tp = importlib.util.module_from_spec(spec)
sys.modules["token_probes"] = tp
spec.loader.exec_module(tp)


# ----------------------------------------------------------------------------- probe


def test_window_features_give_each_slot_its_own_block():
    tokens = np.array([[0], [1], [2]])
    x = tp.window_features(tokens, [3], 1)
    # slots (offset -1, 0, +1), each a block of 3 codes + 1 "beyond the end" index
    assert x.tolist() == [[3, 4, 9], [0, 5, 10], [1, 6, 11]]
    assert tp.n_features([3], 1) == 12
    two = tp.window_features(np.array([[0, 5], [1, 6]]), [2, 7], 0)
    assert two.tolist() == [[0, 3 + 5], [1, 3 + 6]]


def _synthetic_split(rng, n_chains=40, length=60, n_classes=3):
    labels = [rng.integers(0, n_classes, length) for _ in range(n_chains)]
    split = ["test" if i % 3 == 0 else "train" for i in range(n_chains)]
    return labels, split


@pytest.mark.parametrize("w", [0, 2])
def test_a_probe_that_sees_the_label_scores_100_percent(w):
    rng = np.random.default_rng(0)
    labels, split = _synthetic_split(rng)
    x = [tp.window_features(y[:, None], [3], w) for y in labels]
    tr = [i for i, s in enumerate(split) if s == "train"]
    te = [i for i, s in enumerate(split) if s == "test"]
    x_tr, y_tr = np.concatenate([x[i] for i in tr]), np.concatenate([labels[i] for i in tr])
    pred = tp.train_probe(x_tr, y_tr, np.concatenate([x[i] for i in te]), tp.n_features([3], w), 3)
    assert np.mean(pred == np.concatenate([labels[i] for i in te])) > 0.99


def test_a_probe_on_random_tokens_scores_chance():
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.choice(3, size=2 * n, p=[0.5, 0.3, 0.2])
    tokens = rng.integers(0, 50, size=(2 * n, 1))
    x = tp.window_features(tokens, [50], 0)
    pred = tp.train_probe(x[:n], y[:n], x[n:], tp.n_features([50], 0), 3)
    acc = np.mean(pred == y[n:])
    assert abs(acc - np.mean(y[n:] == 0)) < 0.04  # the majority class, nothing more


def test_a_ridge_probe_recovers_a_per_token_value():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 10, size=(2000, 1))
    value = np.linspace(0, 30, 10)[tokens[:, 0]]
    x = tp.window_features(tokens, [10], 0)
    pred = tp.train_probe(x[:1000], value[:1000], x[1000:], tp.n_features([10], 0), 1)
    assert np.abs(pred - value[1000:]).max() < 0.5


@pytest.fixture(scope="module")
def promod3(shared):
    return tp.promod3_chains(str(shared / "data" / "promod3"), 9, 40, 150)


def _source(name, columns_of):
    """A Source whose tokens are given by ``columns_of(chain_backbone) -> (L, C)``."""

    def encode(bbs):
        return [columns_of(bb) for bb in bbs], None

    return encode


def test_probe_scores_on_real_chains_know_the_dssp_labels(promod3):
    assert len(promod3) == 9 and {c.split for c in promod3} == {"train", "test"}
    for ch in promod3:  # labels line up with residues
        assert len(ch.dssp) == len(ch.backbone) == len(tp.contact_number(ch.backbone))
    by_seq = {c.backbone.sequence: c for c in promod3}
    rng = np.random.default_rng(0)

    def cols(bb):  # stage 1 random, stage 2 the DSSP 8-state label
        s8 = tp.ss_labels(by_seq[bb.sequence].dssp)[1]
        return np.stack([rng.integers(0, 64, len(bb)), s8], axis=1)

    src = tp.Source("fake", "residue", [64, 8], [None, None], _source("fake", cols))
    views = {v.label: v for v in tp.views_of(src)}
    assert list(views) == ["fake stage 1", "fake stage 2", "fake stages 1-2"]
    feats, _ = src.encode([c.backbone for c in promod3])
    enc = {c.id: f for c, f in zip(promod3, feats, strict=True)}
    label = tp.probe_scores(views["fake stage 2"], enc, promod3, 0)
    joint = tp.probe_scores(views["fake stages 1-2"], enc, promod3, 0)
    noise = tp.probe_scores(views["fake stage 1"], enc, promod3, 0)
    majority = tp.majority_baseline(promod3)
    assert label["ss3"] > 0.99 and label["ss8"] > 0.99
    assert joint["ss8"] > 0.95
    assert noise["ss3"] < majority["ss3"] + 0.1


# ----------------------------------------------------------------------------- 3Di


def test_mini3di_gives_one_letter_per_residue_as_biotite_does(shared):
    """mini3di against biotite's own port of Foldseek's encoder on a real structure: one state
    per residue, the same states (biotite uses the file's Cb, mini3di places it from N, CA, C,
    so a residue or two may differ)."""
    import biotite.structure as struc
    import biotite.structure.io.pdbx as pdbx
    from biotite.structure.alphabet import to_3di

    from protoken.structure import read_backbones

    path = shared / "data" / "structures" / "biopython__1A7G.cif"
    bb = read_backbones(str(path), chains="first", models="first")[0]
    src = tp.mini3di_source()
    feats, _ = src.encode([bb])
    assert feats[0].shape == (len(bb), 1)
    mine = "".join(src.letters[i] for i in feats[0][:, 0])
    atoms = pdbx.get_structure(pdbx.CIFFile.read(str(path)), model=1)
    atoms = atoms[struc.filter_amino_acids(atoms)]
    atoms = atoms[atoms.chain_id == atoms.chain_id[0]]
    ref = str(to_3di(atoms)[0][0]).upper()
    assert len(ref) == len(mine) == 82
    assert np.mean([a == b for a, b in zip(mine, ref, strict=True)]) > 0.95


# ----------------------------------------------------------------------------- alignment


def _blosum():
    import biotite.sequence.align as balign

    m = balign.SubstitutionMatrix.std_protein_matrix()
    letters = "".join(str(s) for s in m.get_alphabet1())
    return m.score_matrix(), letters


def test_alignment_scorer_known_cases():
    mat, letters = _blosum()
    code = {c: letters.index(c) for c in letters}
    w10 = np.array([code["W"]] * 10)
    w_ins = np.array([code["W"]] * 5 + [code["A"]] + [code["W"]] * 5)
    unrelated = np.array([code["G"]] * 10)
    s = tp.align_scores_biotite([w10, w_ins, unrelated], mat, letters)
    assert s[0, 0] == 110  # W-W scores 11
    assert s[0, 1] == s[1, 0] == 110 - tp.GAP_OPEN  # ten matches around a one-residue gap
    assert s[0, 2] == 0  # W-G is negative: an empty local alignment
    dense = tp.sw_score(mat[w10][:, w_ins])
    assert dense == 110 - tp.GAP_OPEN


def test_dense_scorer_equals_biotite_on_random_sequences():
    mat, letters = _blosum()
    rng = np.random.default_rng(3)
    aa = [letters.index(c) for c in tp.AA]
    base = rng.choice(aa, 60)
    seqs = [base, np.delete(base, range(20, 26)), rng.choice(aa, 45), rng.choice(aa, 70)]
    seqs[3][10:40] = base[25:55]  # a shared segment
    ref = tp.align_scores_biotite(seqs, mat, letters)
    for i in range(len(seqs)):
        for j in range(len(seqs)):
            assert tp.sw_score(mat[seqs[i]][:, seqs[j]]) == ref[i, j]


def test_distance_log_odds_rewards_near_codes():
    rng = np.random.default_rng(4)
    vectors = np.linspace(-1, 1, 32)[:, None]  # codes on a line
    a = rng.integers(0, 32, 5000)
    b = np.clip(a + rng.choice([-1, 0, 0, 0, 1], 5000), 0, 31)  # mostly kept, else a neighbour
    edges, scores = tp.distance_log_odds(vectors, (a, b), rng.integers(0, 32, 5000))
    assert scores[0] > 4 and scores[-1] < -4
    assert np.all(np.diff(scores) <= 0)
    mat = tp.substitution_matrix(vectors, edges, scores)
    assert mat.shape == (32, 32) and np.array_equal(mat, mat.T)
    assert mat[5, 5] > mat[5, 6] > mat[5, 20]


def test_search_figures_known_answers():
    tm = np.array([[1.0, 0.8, 0.2], [0.7, 1.0, 0.3], [0.2, 0.3, 1.0]])
    good = tp.search_figures(tm.copy(), tm)
    assert good["rho"] == pytest.approx(1.0) and good["top_hit"] == 1.0
    assert good["answerable"] == 2
    bad = tp.search_figures(-tm, tm)  # the worst ranking: top hits are the dissimilar ones
    assert bad["rho"] == pytest.approx(-1.0) and bad["top_hit"] == 0.0


# ----------------------------------------------------------------------------- codebooks


def test_efficiency_and_cosine_known_answers():
    e = tp.efficiency(np.array([0, 1, 2, 3] * 5), 8)
    assert e["utilisation"] == 0.5 and e["perplexity"] == pytest.approx(4.0)
    c = tp.cosine_stats(np.array([[1.0, 0], [0, 1.0], [1.0, 1.0]]))
    assert c["max"] == pytest.approx(np.sqrt(0.5)) and c["mean"] == pytest.approx(
        np.sqrt(0.5) * 2 / 3
    )


def test_code_vectors_of_a_residual_fsq_per_stage():
    """A model holding a residual FSQ (the multi-stage per-residue tokenizer): one (V, D)
    array per stage, later stages finer (smaller steps)."""
    from torch import nn
    from vector_quantize_pytorch import ResidualFSQ

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = ResidualFSQ(dim=3, levels=[4, 4, 4], num_quantizers=2)

    vecs = tp.code_vectors(Toy(), "residue")
    assert len(vecs) == 2 and vecs[0].shape == vecs[1].shape == (64, 3)
    assert np.abs(vecs[1]).max() < np.abs(vecs[0]).max()
    assert len(np.unique(vecs[0], axis=0)) == 64


def test_code_vectors_of_the_bundled_tokenizers():
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("residue")
    res = tp.code_vectors(tok.model, "residue")
    assert len(res) == tok.config.n_stages  # one alphabet per residual stage
    for stage in res:
        assert stage.shape == (4096, 4) and len(np.unique(stage, axis=0)) == 4096
    grid = Tokenizer.from_pretrained("default")
    vecs = tp.code_vectors(grid.model, "grid")
    assert len(vecs) == grid.config.n_levels
    assert all(v.shape[0] == grid.config.codebook_size for v in vecs)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_tiny_run_writes_the_table_and_json(shared, tmp_path):
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    data = shared / "data"
    rc = tp.main(["--tokenizer", "residue", "--probe-chains", "9", "--pairs", "3", "--search",
                  "5", "--max-len", "150", "--promod3", str(data / "promod3"), "--train",
                  str(data / "train"), "--structures", str(data / "structures"), "--cache",
                  str(tmp_path / "cache"), "--out", str(out), "--json", str(js)])  # fmt: skip
    assert rc == 0
    table = out.read_text()
    from protoken.tokenizer import Tokenizer

    k = Tokenizer.from_pretrained("residue").config.n_stages  # a row per stage, joint rows
    ours = {"residue"} if k == 1 else {f"residue stage {i}" for i in range(1, k + 1)} | {
        f"residue stages 1-{j}" for j in range(2, k + 1)}  # fmt: skip
    for label in ("aa", "3Di", "3Di (derived)", *ours):
        assert f"| {label} |" in table
    res = json.loads(js.read_text())
    assert {r["label"] for r in res["rows"]} == {"aa", "3Di"} | ours
    assert res["meta"]["counts"]["search"] == 5
    assert set(res["meta"]["splits"]["probe_test"]).isdisjoint(res["meta"]["splits"]["probe_train"])
    again = tmp_path / "again.md"
    assert tp.main(["--from-json", str(js), "--out", str(again)]) == 0
    assert again.read_text() == table


def test_clean_matches_leave_out_residues_next_to_a_missing_one():
    iu = np.arange(20)
    ib = np.r_[np.arange(10), np.arange(11, 21)]  # one residue of the second file unmatched
    ok = tp.clean_matches(iu, ib, 3)
    assert np.flatnonzero(ok).tolist() == [3, 4, 5, 6, 13, 14, 15, 16]


def _results(checkpoint="abc"):
    eff = {"used": 10, "size": 20, "utilisation": 0.5, "perplexity": 8.0}
    probe = {"ss3": 0.7, "ss8": 0.5, "cn": 0.4}
    sens = {"residue_rho": 0.3, "protein_rho": 0.5, "changed": 0.4, "changed_static": 0.2}
    rows = [{"label": k, "source": k, "columns": [0], "probe_w0": probe, "probe_w": probe,
             "sensitivity": sens, "search": {"rho": 0.4, "top_hit": 0.5}}
            for k in ("aa", "3Di", "residue")]  # fmt: skip
    counts = {"probe_train": 2, "probe_test": 1, "pairs": 3, "search": 4}
    sources = {k: {"efficiency": [eff], "checkpoint": checkpoint if k == "residue" else ""}
               for k in ("aa", "3Di", "residue")}  # fmt: skip
    return {"rows": rows, "sources": sources, "meta": {"counts": counts, "summary": ["- x."]}}


def test_the_card_section_quotes_only_the_same_checkpoint(tmp_path):
    assert tp.card_section("residue", "other", _results("abc")) == ""
    section = tp.card_section("residue", "abc", _results("abc"))
    assert "| residue | 0.700 |" in section and "| 3Di |" in section
    card = tmp_path / "residue.md"
    card.write_text("# residue\n\nfigures\n\n## Limitations\n\n- some\n")
    assert tp.update_card(str(card), section)
    text = card.read_text()
    assert text.index("What the tokens know") < text.index("## Limitations")
    assert not tp.update_card(str(card), section)  # the same section again: unchanged
    assert tp.update_card(str(card), section.replace("0.700", "0.800"))
    assert card.read_text().count("What the tokens know") == 1


def test_dense_all_pairs_scorer_equals_biotite_with_the_same_matrix():
    """Joint-stage search scores position pairs from vectors: with one-hot vectors and a
    log-odds table, the batched scorer must give biotite's scores under the equivalent matrix
    (targets of different lengths padded together)."""
    rng = np.random.default_rng(5)
    vectors = np.eye(6)  # distance 0 (same code) or sqrt(2)
    edges, scores = np.array([np.inf]), np.array([5.0, -3.0])
    seqs = [rng.integers(0, 6, n) for n in (30, 12, 45, 20)]
    seqs[2][5:25] = seqs[0][3:23]
    dense = tp.align_scores_dense([vectors[s] for s in seqs], edges, scores)
    ref = tp.align_scores_biotite(seqs, tp.substitution_matrix(vectors, edges, scores))
    assert np.array_equal(dense, ref)


class _TwoStageTokenizer:
    """A stand-in for a residual-FSQ per-residue tokenizer (codes (L, 2)): stage 1 the binned
    CA(i-1)-CA(i+1) distance, stage 2 the binned CA(i-2)-CA(i+2) distance, 8 codes each."""

    checkpoint = "twostage"

    def __init__(self):
        from torch import nn
        from vector_quantize_pytorch import ResidualFSQ

        self.model = nn.Module()
        self.model.quantizer = ResidualFSQ(dim=1, levels=[8], num_quantizers=2)
        self.config = type("C", (), {"codebook_size": 8})()

    @staticmethod
    def _codes(bb):
        ca = bb.ca
        cols = []
        for k, (lo, hi) in ((1, (4.5, 7.5)), (2, (5.0, 13.0))):
            d = np.full(len(ca), (lo + hi) / 2)
            d[k:-k] = np.linalg.norm(ca[2 * k :] - ca[: -2 * k], axis=1)
            cols.append(np.clip(((d - lo) / (hi - lo) * 8).astype(int), 0, 7))
        return np.stack(cols, axis=1)

    def encode(self, bb):
        codes = self._codes(bb)  # (L, 2): like Tokens, stage 1 alone is `codes`
        return type("T", (), {"stages": codes, "codes": codes[:, 0]})()

    def encode_many(self, bbs):
        return [self.encode(bb) for bb in bbs]


@pytest.mark.slow
def test_a_two_stage_tokenizer_gets_a_row_per_stage_and_joint_rows(shared, tmp_path, monkeypatch):
    from protoken.tokenizer import Tokenizer

    monkeypatch.setattr(
        Tokenizer, "from_checkpoint", staticmethod(lambda spec: _TwoStageTokenizer())
    )
    js = tmp_path / "t.json"
    data = shared / "data"
    rc = tp.main(["--tokenizer", "twostage", "--probe-chains", "9", "--pairs", "3", "--search",
                  "5", "--max-len", "150", "--promod3", str(data / "promod3"), "--train",
                  str(data / "train"), "--structures", str(data / "structures"), "--cache",
                  str(tmp_path / "cache"), "--out", str(tmp_path / "t.md"),
                  "--json", str(js)])  # fmt: skip
    assert rc == 0
    rows = {r["label"]: r for r in json.loads(js.read_text())["rows"]}
    assert {"twostage stage 1", "twostage stage 2", "twostage stages 1-2"} <= set(rows)
    joint = rows["twostage stages 1-2"]
    assert joint["columns"] == [0, 1]
    assert joint["search"]["matrix"].startswith("derived from summed code vectors")
    assert np.isfinite(joint["search"]["rho"])
    # the binned CA(i-1)-CA(i+1) distance knows helices from strands
    assert rows["twostage stage 1"]["probe_w0"]["ss3"] > 0.6


@pytest.mark.parametrize("name", ["residue", "default"])
def test_bundled_cards_quote_the_probe_results_of_their_weights(name):
    # a release rewrites the card from its template; the section must come back with it
    from protoken import pretrained

    results = json.loads((REPO / "docs" / "token_probes.json").read_text())
    section = tp.card_section(name, pretrained.load(name)["checkpoint_id"], results)
    if not section:
        pytest.skip(f"docs/token_probes.json holds no results of the bundled {name}")
    assert section in pretrained.card(name)
