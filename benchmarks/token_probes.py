"""What the tokens know: StructTokenBench-style measures beside reconstruction, for our
tokenizers, Foldseek's 3Di alphabet and the amino-acid sequence, on the same proteins.

    python benchmarks/token_probes.py [--tokenizer residue --tokenizer default] [--quick]
                                      [--out docs/token_probes.md] [--json docs/token_probes.json]
                                      [--cards]

``--tokenizer`` takes a bundled name or a checkpoint path and may be repeated. CPU only: about
15 CPU-minutes for the full run with the two bundled tokenizers, of which TM-align of the
search set is a third (cached after the first run); ``--quick`` (24 chains, 6 pairs, 12
search chains) takes about one CPU-minute. ``--cards`` also puts each bundled tokenizer's rows
into its model card (between ``<!-- token-probes -->`` markers; only when the results are of
the card's checkpoint). What is compared:

- ``aa``: the amino-acid sequence (the floor: no structure at all);
- ``3Di``: Foldseek's 20-letter alphabet by ``mini3di`` (a numpy port of Foldseek's encoder;
  Cb placed from N, CA, C as Foldseek does for glycines);
- each ``--tokenizer``: a per-residue tokenizer gives ``Tokens.stages`` of shape ``(L, K)``
  for K residual stages; each stage is a row of its own and, for K > 1, stages 1..k
  jointly (probes: one-hot of each stage side by side; search: the summed stage vectors). A
  grid tokenizer (``default``) has no per-residue tokens: its probe and sensitivity rows use,
  for residue i, the code of the diagonal cell (i // s, i // s) of every level (a proxy), and
  it has no search row.

Measures (all on CPU; the sets are chosen by md5 of an id, so every run sees the same ones):

- **Effectiveness**: per-residue secondary structure (DSSP, 3 and 8 states) and contact number
  (virtual-Cb neighbours within 10 A, |i - j| >= 3) from frozen tokens by a linear probe on the
  one-hot code (plus, in the ``+-w`` columns, its w neighbours on each side), trained on one
  split of ProMod3 chains and scored on the other; the split is by PDB id (one chain per PDB
  entry). Figures: accuracy (SS) and Spearman (contact number) on the test split.
- **Sensitivity**: BM5 bound/unbound pairs of one protein (``../shared/data/train``, residues
  matched by a global alignment of their sequences). Per residue: Spearman between token
  disagreement and the local structural change 1 - lDDT_i (CA, unbound as the reference);
  per protein: Spearman between token identity and the pair's TM-score.
- **Search** (Foldseek's use): all pairs of held-out chains (``configs/heldout.tsv``) scored by
  Smith-Waterman local alignment of their token sequences (biotite's ``align_optimal``; gap
  open 11, extend 1 for every alphabet), BLOSUM62 for amino acids, Foldseek's 3Di matrix for
  3Di, and for code-vector tokens a log-odds matrix in half-bits that is a function of the
  distance between code vectors, estimated on the BM5 matched residues against random
  residue pairs (the same recipe applied to 3Di's centroids gives the ``3Di (derived)`` row,
  which says what the recipe loses against a matrix trained as Foldseek's was). Figures:
  Spearman between score and TM-score (TM-align by tmtools, mean of both normalisations) over
  all pairs, and how often a query's top hit has TM > 0.5 (normalised by the query) among the
  queries that have such a chain in the set.
- **Efficiency and distinctiveness**: codebook utilisation and perplexity per stage (level) on
  the ProMod3 test split; mean and max off-diagonal cosine similarity of the code vectors.

Writes ``--out`` (a markdown table, generated) and ``--json`` (every figure); TM-scores of the
search set are cached under ``--cache`` (they do not depend on the tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data")

#: DSSP 8 states (and "C" for coil, "-" / " " mapped to it) -> index; 3 states: H (H G I),
#: E (E B), C (the rest), the usual reduction.
SS8 = "HGIEBTSC"
SS3_OF = {"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}
AA = "ACDEFGHIKLMNPQRSTVWY"
GAP_OPEN, GAP_EXTEND = 11, 1
TM_HIT = 0.5


# ============================================================================ data


@dataclass
class Chain:
    """One protein chain: its id, backbone and (ProMod3) DSSP string and split."""

    id: str
    backbone: object  # protoken.structure.Backbone
    dssp: str = ""
    split: str = ""


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def promod3_chains(folder: str, n_pdb: int, min_len: int = 40, max_len: int = 500,
                   test_every: int = 3) -> list[Chain]:  # fmt: skip
    """``n_pdb`` ProMod3 chains with their DSSP strings, one per PDB entry, the entries taken in
    the order of md5(pdb_id); every ``test_every``-th one (in that order) is the test split,
    the others the probe training split (so the split is by PDB id).

    Only chains of ``min_len``-``max_len`` residues whose decoded backbone has as many residues
    as the DSSP string are used.
    """
    import foldcomp

    from protoken.structure import read_backbones

    rows: dict[str, dict] = {}
    with open(os.path.join(folder, "chains.tsv")) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        for line in fh:
            row = dict(zip(header, line.rstrip("\n").split("\t"), strict=True))
            if not min_len <= int(row["length"]) <= max_len or len(row["dssp"]) != int(
                row["length"]
            ):
                continue
            if row["pdb_id"] not in rows or row["entry"] < rows[row["pdb_id"]]["entry"]:
                rows[row["pdb_id"]] = row
    order = sorted(rows, key=_md5)[: n_pdb + n_pdb // 10]  # a few spare for unreadable entries
    wanted = {rows[p]["entry"]: rows[p] for p in order}
    got: dict[str, Chain] = {}
    with foldcomp.open(os.path.join(folder, "promod3"), ids=list(wanted)) as db:
        for name, pdb in db:
            row = wanted[name]
            try:
                bb = read_backbones(name + ".pdb", data=pdb.encode())[0]
            except Exception as exc:  # a damaged entry is left out, said once
                print(f"  {name}: left out ({exc})", file=sys.stderr)
                continue
            if len(bb) != len(row["dssp"]):
                continue
            got[row["pdb_id"]] = Chain(name, bb, row["dssp"])
    chains = [got[p] for p in order if p in got][:n_pdb]
    for i, ch in enumerate(chains):
        ch.split = "test" if i % test_every == 0 else "train"
    return chains


def bm5_pairs(folder: str, n_pairs: int, max_len: int = 600, min_identity: float = 0.95):
    """Up to ``n_pairs`` (id, unbound, bound, matched index pairs) of BM5: each chain of an
    ``XXXX_[rl]_u`` file with the same chain of its ``XXXX_[rl]_b-matched`` file (chains in file
    order), files taken in md5 order of their names. Residues are matched by a global
    alignment of the two sequences (BLOSUM62); pairs below ``min_identity`` over the aligned
    residues, or of other chain counts, are left out."""
    from protoken.structure import read_backbones

    names = sorted((f for f in os.listdir(folder) if f.endswith("_u.pdb.gz")), key=_md5)
    out = []
    for name in names:
        bound = os.path.join(folder, name.replace("_u.pdb.gz", "_b-matched.pdb.gz"))
        if not os.path.exists(bound):
            continue
        try:
            us = read_backbones(os.path.join(folder, name), chains="split", models="first")
            bs = read_backbones(bound, chains="split", models="first")
        except Exception as exc:
            print(f"  {name}: left out ({exc})", file=sys.stderr)
            continue
        if len(us) != len(bs):
            continue
        for u, b in zip(us, bs, strict=True):
            if not 40 <= len(u) <= max_len or not 40 <= len(b) <= max_len:
                continue
            iu, ib = match_residues(u.sequence, b.sequence)
            if len(iu) < 0.8 * min(len(u), len(b)):
                continue
            same = np.mean([u.sequence[i] == b.sequence[j] for i, j in zip(iu, ib, strict=True)])
            if same < min_identity:
                continue
            out.append((u.id, u, b, iu, ib))
            if len(out) == n_pairs:
                return out
    return out


def match_residues(a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the residues of sequences ``a`` and ``b`` paired by an optimal
    global alignment (biotite, BLOSUM62, gap open 11, extend 1), gaps left out."""
    import biotite.sequence as bseq
    import biotite.sequence.align as balign

    matrix = balign.SubstitutionMatrix.std_protein_matrix()
    sa, sb = bseq.ProteinSequence(_clean(a)), bseq.ProteinSequence(_clean(b))
    ali = balign.align_optimal(sa, sb, matrix, gap_penalty=(-GAP_OPEN, -GAP_EXTEND),
                               terminal_penalty=False, max_number=1)[0]  # fmt: skip
    tr = ali.trace
    keep = (tr >= 0).all(axis=1)
    return tr[keep, 0].astype(np.int64), tr[keep, 1].astype(np.int64)


def _clean(seq: str) -> str:
    """One-letter sequence in biotite's protein alphabet (anything else -> X)."""
    ok = set(AA) | {"X"}
    return "".join(c if c in ok else "X" for c in seq.upper())


def heldout_chains(structures: str, max_len: int, limit: int | None) -> list[Chain]:
    """The held-out files of ``configs/heldout.tsv`` (40-``max_len`` residues, first chain of
    the first model), in name order."""
    sys.path.insert(0, HERE)
    from heldout import read_heldout
    from protoken.structure import read_backbones

    out = []
    for path in read_heldout(structures, 40, max_len):
        try:
            bb = read_backbones(path, chains="first", models="first")[0]
        except Exception as exc:
            print(f"  {path}: left out ({exc})", file=sys.stderr)
            continue
        out.append(Chain(os.path.basename(path), bb))
        if limit and len(out) == limit:
            break
    return out


# ============================================================================ labels


def ss_labels(dssp: str) -> tuple[np.ndarray, np.ndarray]:
    """DSSP string -> (3-state, 8-state) integer labels per residue."""
    s8 = np.array([SS8.index(c) if c in SS8 else SS8.index("C") for c in dssp], dtype=np.int64)
    s3 = np.array([SS3_OF.get(c, 2) for c in dssp], dtype=np.int64)
    return s3, s8


def contact_number(bb, radius: float = 10.0, min_sep: int = 3) -> np.ndarray:
    """Virtual-Cb neighbours of each residue within ``radius`` Angstrom, |i - j| >= ``min_sep``,
    shape (L,)."""
    from protoken.geometry import pairwise_distances, virtual_cb

    cb = virtual_cb(bb.n, bb.ca, bb.c)
    d = pairwise_distances(cb)
    idx = np.arange(len(cb))
    far = np.abs(idx[:, None] - idx[None, :]) >= min_sep
    return ((d < radius) & far).sum(axis=1).astype(np.float64)


# ============================================================================ tokenizers


@dataclass
class Source:
    """Something that turns a backbone into tokens.

    ``encode(backbones)`` gives per protein an int array (L, C): C token columns per residue
    (stages; levels' diagonal cells for a grid tokenizer), and for grid tokenizers also the
    grids (``grids``: per protein, per level). ``sizes`` are the alphabet sizes of the columns,
    ``vectors`` their code vectors (V_c, D) or None.
    """

    name: str
    kind: str  # "sequence", "residue", "grid"
    sizes: list[int]
    vectors: list[np.ndarray | None]
    encode: Callable[[Sequence], tuple[list[np.ndarray], list | None]]
    note: str = ""
    checkpoint: str = ""  # a protoken tokenizer's checkpoint id
    letters: str = ""  # for alphabets with a published substitution matrix


def aa_source() -> Source:
    def encode(bbs):
        lut = {c: i for i, c in enumerate(AA)}
        return [
            np.array([[lut.get(c, len(AA))] for c in bb.sequence], np.int64) for bb in bbs
        ], None

    return Source(
        "aa", "sequence", [len(AA) + 1], [None], encode, "amino acids (X = 20)", letters=AA
    )


def mini3di_source() -> Source:
    import mini3di

    enc = mini3di.Encoder()
    letters = "".join(mini3di.encoder.ALPHABET[:20])

    def encode(bbs):
        out = []
        for bb in bbs:
            states = enc.encode_atoms(bb.ca, np.full_like(bb.ca, np.nan), bb.n, bb.c)
            out.append(np.asarray(states.filled(), dtype=np.int64)[:, None])
        return out, None

    centroids = np.asarray(mini3di.Encoder._CENTROIDS, dtype=np.float64)
    return Source(
        "3Di", "residue", [20], [centroids], encode, "Foldseek 3Di (mini3di)", letters=letters
    )


def tokenizer_source(spec: str, probe_backbone) -> Source:
    """A protoken tokenizer by bundled name or checkpoint path, by the public API only."""
    import torch

    from protoken.tokenizer import Tokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tok = Tokenizer.from_checkpoint(spec)
    name = os.path.basename(spec) if os.path.exists(spec) else spec
    first = tok.encode(probe_backbone)
    try:
        codes = np.asarray(first.stages)  # (L, K): every residual stage
        kind = "residue"
    except ValueError:
        kind = "grid"
    size = int(tok.config.codebook_size)
    vectors = code_vectors(tok.model, kind)
    if kind == "residue":
        k = 1 if codes.ndim == 1 else codes.shape[1]
        if vectors is not None and len(vectors) != k:
            vectors = None
        vectors = vectors or [None] * k
        # a stage's alphabet: its code vectors when known (the config may give the total)
        sizes = [len(v) if v is not None else size for v in vectors]

        def encode(bbs):
            out = []
            for t in _encode_all(tok, bbs):
                out.append(np.asarray(t.stages, dtype=np.int64))
            return out, None

        note = f"{k} stage(s) of {size} codes"
        return Source(name, kind, sizes, vectors, encode, note, checkpoint=tok.checkpoint)

    scales = list(reversed(tok.config.level_scales))  # coarsest first, as Tokens.levels
    sizes = [size] * len(scales)
    vectors = vectors or [None] * len(scales)

    def encode_grid(bbs):
        feats, grids = [], []
        for bb, t in zip(bbs, _encode_all(tok, bbs), strict=True):
            idx = np.arange(len(bb))
            feats.append(np.stack([g[idx // s, idx // s] for g, s in
                                   zip(t.levels, scales, strict=True)], axis=1))  # fmt: skip
            grids.append([np.asarray(g) for g in t.levels])
        return feats, grids

    note = f"grid, {len(scales)} levels (scales {scales}) of {size} codes"
    return Source(name, kind, sizes, vectors, encode_grid, note, checkpoint=tok.checkpoint)


def _encode_all(tok, bbs):
    """Tokens of many backbones in batches of the tokenizer's batch size (same codes as one by
    one: padding never changes a protein's codes)."""
    return list(tok.encode_many(bbs))


def code_vectors(model, kind: str) -> list[np.ndarray] | None:
    """Code vectors of a tokenizer's quantiser(s), per stage (residue layout) or per level
    coarsest first (grid layout), or None when they cannot be found.

    Looked up, in this order: a ``model.code_vectors()`` method (list of (V, D) arrays); a
    vector-quantize-pytorch ``ResidualFSQ`` (stage k: its implicit codebook times the stage's
    scale); an ``FSQ`` (its implicit codebook); protoken's EMA ``VectorQuantizer``s (their
    ``embed`` buffers; ``model.quantizers`` is finest first).
    """
    import torch

    with torch.no_grad():
        if hasattr(model, "code_vectors"):
            return [np.asarray(v, dtype=np.float64) for v in model.code_vectors()]
        try:
            from vector_quantize_pytorch import FSQ, ResidualFSQ
        except ImportError:  # pragma: no cover - a dependency of protoken
            FSQ = ResidualFSQ = ()
        mods = list(model.modules())
        for m in mods:
            if ResidualFSQ and isinstance(m, ResidualFSQ):
                books = m.codebooks.float()
                scales = m.scales.float()
                return [(books[k] * scales[k]).cpu().numpy().astype(np.float64)
                        for k in range(books.shape[0])]  # fmt: skip
        for m in mods:
            if FSQ and isinstance(m, FSQ):
                return [m.implicit_codebook.float().cpu().numpy().astype(np.float64)]
        quantizers = getattr(model, "quantizers", None)
        if quantizers is not None and all(hasattr(q, "embed") for q in quantizers):
            books = [q.embed.float().cpu().numpy().astype(np.float64) for q in quantizers]
            return books[::-1] if kind == "grid" else books
    return None


# ============================================================================ rows


@dataclass
class View:
    """A row of the table: a source and the token columns it reads (one stage, or stages 1..k
    jointly)."""

    label: str
    source: Source
    columns: list[int]
    search: bool = True  # a token sequence to align

    @property
    def sizes(self) -> list[int]:
        return [self.source.sizes[c] for c in self.columns]

    def vectors(self) -> np.ndarray | None:
        """Code vectors of a single column; None for joint views or without vectors."""
        if len(self.columns) != 1:
            return None
        return self.source.vectors[self.columns[0]]


def views_of(src: Source) -> list[View]:
    n = len(src.sizes)
    if src.kind == "grid":
        return [View(f"{src.name} (diagonal cells, {n} levels)", src, list(range(n)), False)]
    if n == 1:
        return [View(src.name, src, [0])]
    rows = [View(f"{src.name} stage {k + 1}", src, [k]) for k in range(n)]
    rows += [View(f"{src.name} stages 1-{k}", src, list(range(k))) for k in range(2, n + 1)]
    return rows


# ============================================================================ probes


def window_features(tokens: np.ndarray, sizes: Sequence[int], w: int) -> np.ndarray:
    """One-hot inputs of a linear probe as indices: residue i's token in each column and, for
    ``w`` > 0, the tokens of residues i-w .. i+w, each (column, offset) slot with its own
    block of indices (an extra index per slot for "beyond the chain end").

    Parameters
    ----------
    tokens : ndarray, shape (L, C), int
    sizes : sequence of int
        Alphabet size of each column.
    w : int
        Window half-width.

    Returns
    -------
    ndarray, shape (L, C * (2w + 1)), int64
        Indices into a table of ``sum over slots of (size + 1)`` rows (:func:`n_features`).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    cols, base = [], 0
    for off in range(-w, w + 1):
        j = np.arange(n) + off
        inside = (j >= 0) & (j < n)
        for c, size in enumerate(sizes):
            t = np.full(n, size, dtype=np.int64)
            t[inside] = tokens[j[inside], c]
            cols.append(base + np.clip(t, 0, size))
            base += size + 1
    return np.stack(cols, axis=1)


def n_features(sizes: Sequence[int], w: int) -> int:
    return (2 * w + 1) * sum(s + 1 for s in sizes)


def one_hot(x: np.ndarray, n_in: int):
    """Index rows (N, F) (:func:`window_features`) -> a sparse 0/1 matrix (N, n_in)."""
    from scipy import sparse

    x = np.asarray(x, dtype=np.int64)
    n, f = x.shape
    indptr = np.arange(0, n * f + 1, f)
    return sparse.csr_matrix((np.ones(n * f), x.ravel(), indptr), shape=(n, n_in))


def train_probe(x_train, y_train, x_test, n_in: int, n_out: int, l2: float = 1.0,
                max_iter: int = 300) -> np.ndarray:  # fmt: skip
    """Fit a linear probe on one-hot inputs given as indices (:func:`window_features`) and
    predict the test rows.

    ``n_out`` > 1: multinomial logistic regression (summed cross-entropy plus ``l2`` / 2 times
    the squared weights, bias unpenalised) by scipy's L-BFGS with the analytic gradient.
    ``n_out`` == 1: ridge regression (scipy's sparse LSQR with damping sqrt(``l2``)) of the
    centred target. One-hot inputs of a few thousand codes are sparse, so either is a few
    sparse products per iteration.

    Returns
    -------
    ndarray
        Predicted classes (N_test,) int, or predicted values (N_test,) float.
    """
    from scipy.optimize import minimize
    from scipy.sparse.linalg import lsqr

    xtr, xte = one_hot(x_train, n_in), one_hot(x_test, n_in)
    y = np.asarray(y_train)
    if n_out == 1:
        mu = float(y.mean())
        w = lsqr(xtr, y - mu, damp=np.sqrt(l2), atol=1e-8, btol=1e-8)[0]
        return xte @ w + mu
    onehot_y = np.eye(n_out)[y]

    def loss(theta):
        w, b = theta[:-n_out].reshape(n_in, n_out), theta[-n_out:]
        z = xtr @ w + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        g = np.exp(logp) - onehot_y
        value = -(logp * onehot_y).sum() + 0.5 * l2 * (w * w).sum()
        grad = np.concatenate([(xtr.T @ g + l2 * w).ravel(), g.sum(axis=0)])
        return value, grad

    theta = minimize(loss, np.zeros((n_in + 1) * n_out), jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter}).x  # fmt: skip
    w, b = theta[:-n_out].reshape(n_in, n_out), theta[-n_out:]
    return np.asarray(xte @ w + b).argmax(axis=1)


def probe_scores(
    view: View, enc: dict[str, np.ndarray], chains: list[Chain], w: int
) -> dict[str, float]:
    """SS3 and SS8 accuracy and contact-number Spearman on the test split of ``chains``."""
    from scipy.stats import spearmanr

    parts = {"train": [], "test": []}
    for ch in chains:
        s3, s8 = ss_labels(ch.dssp)
        x = window_features(enc[ch.id][:, view.columns], view.sizes, w)
        parts[ch.split].append((x, s3, s8, contact_number(ch.backbone)))
    tr = [np.concatenate(v) for v in zip(*parts["train"], strict=True)]
    te = [np.concatenate(v) for v in zip(*parts["test"], strict=True)]
    n_in = n_features(view.sizes, w)
    out = {}
    for key, k, n_out in (("ss3", 1, 3), ("ss8", 2, 8)):
        pred = train_probe(tr[0], tr[k], te[0], n_in, n_out)
        out[key] = float(np.mean(pred == te[k]))
    pred = train_probe(tr[0], tr[3], te[0], n_in, 1)
    out["cn"] = float(spearmanr(pred, te[3])[0]) if np.std(pred) > 0 else 0.0
    return out


def majority_baseline(chains: list[Chain]) -> dict[str, float]:
    """Accuracy of always predicting the training split's most common class."""
    res = {}
    for key, k in (("ss3", 0), ("ss8", 1)):
        train = np.concatenate([ss_labels(c.dssp)[k] for c in chains if c.split == "train"])
        test = np.concatenate([ss_labels(c.dssp)[k] for c in chains if c.split == "test"])
        res[key] = float(np.mean(test == np.bincount(train).argmax()))
    return res


# ============================================================================ sensitivity


def clean_matches(iu: np.ndarray, ib: np.ndarray, w: int = 3) -> np.ndarray:
    """Which matched residues have their +-``w`` neighbours matched too, consecutively in
    both chains (a residue next to a missing loop of either file gets other tokens for a
    reason that is no conformational change: such residues are left out)."""
    n = len(iu)
    ok = np.ones(n, dtype=bool)
    for o in range(-w, w + 1):
        k = np.arange(n) + o
        inside = (k >= 0) & (k < n)
        kk = np.clip(k, 0, n - 1)
        ok &= inside & (iu[kk] - iu == o) & (ib[kk] - ib == o)
    return ok


def sensitivity(view: View, enc_u, enc_b, pairs, static: float = 0.05) -> dict[str, float]:
    """Spearman of per-residue token disagreement with 1 - lDDT_i (pooled over the matched
    residues of every pair, :func:`clean_matches`), and of per-protein token identity with the
    pair's TM-score (superposed on the matched residues). Also the fraction of residues whose
    token changed, over all and over the residues whose local structure did not change
    (1 - lDDT_i < ``static``)."""
    from scipy.stats import spearmanr

    from protoken.metrics import lddt, tm_score

    dis, change, ident, tms = [], [], [], []
    for pid, u, b, iu, ib in pairs:
        tu = enc_u[pid][iu][:, view.columns]
        tb = enc_b[pid][ib][:, view.columns]
        d = (tu != tb).mean(axis=1)
        local = 1 - lddt(b.ca[ib], u.ca[iu], per_residue=True)
        ok = np.isfinite(local) & clean_matches(iu, ib)
        if not ok.any():
            continue
        dis.append(d[ok])
        change.append(local[ok])
        ident.append(1 - d[ok].mean())
        tms.append(tm_score(b.ca[ib], u.ca[iu]))
    dis_all, ch_all = np.concatenate(dis), np.concatenate(change)
    still = ch_all < static
    out = {
        "changed": float(dis_all.mean()),
        "changed_static": float(dis_all[still].mean()) if still.any() else float("nan"),
        "static_fraction": float(still.mean()),
        "residues": int(len(dis_all)),
        "identity_median": float(np.median(ident)),
        "tm_median": float(np.median(tms)),
    }
    out["residue_rho"] = float(spearmanr(dis_all, ch_all)[0]) if dis_all.std() > 0 else float("nan")
    out["protein_rho"] = float(spearmanr(ident, tms)[0]) if np.std(ident) > 0 else float("nan")
    return out


# ============================================================================ search


def distance_log_odds(vectors: np.ndarray, matched: tuple[np.ndarray, np.ndarray],
                      background: np.ndarray, n_bins: int = 24, seed: int = 0,
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A substitution score as a function of the distance between code vectors, in half-bits.

    s(bin) = 2 log2(P(d in bin | matched residues) / P(d in bin | random residues)), with bins
    at the quantiles of the random-pair distances (plus one bin for d = 0, identical codes),
    add-one pseudocounts, and made non-increasing in d (nearer codes never score lower).

    Parameters
    ----------
    vectors : ndarray, shape (V, D)
        Code vectors.
    matched : (ndarray, ndarray), each shape (N,)
        Codes of residues known to correspond (BM5 bound/unbound).
    background : ndarray, shape (M,)
        Codes of residues in general; random pairs are drawn from it.

    Returns
    -------
    edges : ndarray, shape (n_bins,)
        Upper bin edges (the last is infinite).
    scores : ndarray, shape (n_bins + 1,)
        Score of d == 0, then of each bin.
    """
    rng = np.random.default_rng(seed)
    a, b = matched
    dm = np.linalg.norm(vectors[a] - vectors[b], axis=1)
    i = rng.integers(0, len(background), 200_000)
    j = rng.integers(0, len(background), 200_000)
    dr = np.linalg.norm(vectors[background[i]] - vectors[background[j]], axis=1)
    pos = dr[dr > 0]
    edges = np.unique(np.quantile(pos, np.linspace(0, 1, n_bins + 1)[1:]))
    edges[-1] = np.inf

    def hist(d):
        k = np.where(d <= 0, 0, 1 + np.searchsorted(edges, d, side="left"))
        return np.bincount(np.minimum(k, len(edges)), minlength=len(edges) + 1) + 1.0

    pm, pr = hist(dm), hist(dr)
    s = 2 * np.log2((pm / pm.sum()) / (pr / pr.sum()))
    return edges, np.minimum.accumulate(s)


def score_of_distance(d: np.ndarray, edges: np.ndarray, scores: np.ndarray) -> np.ndarray:
    k = np.where(d <= 0, 0, 1 + np.searchsorted(edges, d, side="left"))
    return scores[np.minimum(k, len(scores) - 1)]


def substitution_matrix(vectors: np.ndarray, edges, scores) -> np.ndarray:
    """(V, V) integer scores (rounded half-bits) from :func:`distance_log_odds`."""
    v = vectors.astype(np.float32)
    sq = (v * v).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0))
    np.fill_diagonal(d, 0)
    return np.rint(score_of_distance(d, edges, scores)).astype(np.int32)


def align_scores_biotite(seqs: Sequence[np.ndarray], matrix: np.ndarray,
                         letters: str | None = None) -> np.ndarray:  # fmt: skip
    """All-pairs Smith-Waterman scores (biotite ``align_optimal``, local, affine gaps: a gap of
    n costs GAP_OPEN + (n - 1) * GAP_EXTEND) of integer token sequences under ``matrix``
    (V, V). Returns the symmetric (N, N) score matrix (diagonal: self scores)."""
    import biotite.sequence as bseq
    import biotite.sequence.align as balign

    alphabet = bseq.Alphabet(list(letters) if letters else list(range(len(matrix))))
    sub = balign.SubstitutionMatrix(alphabet, alphabet, np.asarray(matrix, dtype=np.int32))
    objs = []
    for s in seqs:
        o = bseq.GeneralSequence(alphabet)
        o.code = np.asarray(s, dtype=np.int64)
        objs.append(o)
    n = len(objs)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            ali = balign.align_optimal(objs[i], objs[j], sub, gap_penalty=(-GAP_OPEN, -GAP_EXTEND),
                                       local=True, max_number=1)  # fmt: skip
            out[i, j] = out[j, i] = ali[0].score if ali else 0
    return out


def sw_batch(row_scores: Callable[[int], np.ndarray], n_rows: int, n_targets: int,
             width: int, gap_open: float = GAP_OPEN, gap_extend: float = GAP_EXTEND,
             ) -> np.ndarray:  # fmt: skip
    """Best local alignment scores (Smith-Waterman, Gotoh affine gaps: a gap of n costs
    ``gap_open + (n - 1) * gap_extend``) of one query against many targets at once.

    Row by row of the query, vectorised over targets and target positions: the vertical gap
    state from the previous row, the horizontal one by a running maximum (opening a gap from
    a cell that itself ends in a horizontal gap never beats extending it, as gap_open >=
    gap_extend), scoring as biotite's ``align_optimal`` (tested equal). For position-specific
    scores (joint stages), where no alphabet-sized matrix exists.

    Parameters
    ----------
    row_scores : callable
        ``row_scores(r)`` -> (n_targets, width) scores of query position r against every
        target position; positions past a target's end must score very low (e.g. -1e9):
        cells right of a target's end never feed back into it, so they never raise its score.
    n_rows : int
        Query length.

    Returns
    -------
    ndarray, shape (n_targets,)
    """
    h_prev = np.zeros((n_targets, width + 1))
    f = np.full((n_targets, width + 1), -np.inf)
    best = np.zeros(n_targets)
    k = np.arange(width + 1) * gap_extend
    e = np.full((n_targets, width + 1), -np.inf)
    for r in range(n_rows):
        f = np.maximum(h_prev - gap_open, f - gap_extend)
        h = np.zeros((n_targets, width + 1))
        h[:, 1:] = np.maximum(np.maximum(h_prev[:, :-1] + row_scores(r), f[:, 1:]), 0)
        # e[j] = max_{m < j} h[m] - gap_open - (j - m - 1) * gap_extend
        run = np.maximum.accumulate(h + k, axis=1)
        e[:, 1:] = run[:, :-1] - k[1:] - gap_open + gap_extend
        h = np.maximum(h, e)
        best = np.maximum(best, h.max(axis=1))
        h_prev = h
    return best


def sw_score(scores: np.ndarray) -> float:
    """:func:`sw_batch` of one (L1, L2) matrix of position-pair scores."""
    s = np.asarray(scores, dtype=np.float64)
    return float(sw_batch(lambda r: s[r][None], s.shape[0], 1, s.shape[1])[0])


def align_scores_dense(vecs: Sequence[np.ndarray], edges, scores) -> np.ndarray:
    """All-pairs local alignment scores (:func:`sw_batch`, each chain against all later ones)
    with position-pair scores s(|v_i - w_j|) of per-residue vectors (the summed code vectors
    of stages 1..k)."""
    n = len(vecs)
    out = np.zeros((n, n))
    for i in range(n):
        targets = vecs[i:]
        width = max(len(t) for t in targets)
        tv = np.zeros((len(targets), width, vecs[i].shape[1]))
        pad = np.ones((len(targets), width), dtype=bool)
        for t, v in enumerate(targets):
            tv[t, : len(v)] = v
            pad[t, : len(v)] = False

        def row(r, q=vecs[i], tv=tv, pad=pad):
            s = score_of_distance(np.linalg.norm(tv - q[r], axis=-1), edges, scores)
            return np.where(pad, -1e9, s)

        out[i, i:] = out[i:, i] = sw_batch(row, len(vecs[i]), len(targets), width)
    return out


def tm_matrix(chains: list[Chain], cache: str | None) -> np.ndarray:
    """TM-align (tmtools) of every pair: (N, N), entry [i, j] normalised by chain i."""
    import tmtools

    h = hashlib.sha1()
    for ch in chains:
        h.update(ch.id.encode())
        h.update(np.ascontiguousarray(ch.backbone.ca, dtype=np.float32).tobytes())
    path = os.path.join(cache, f"tm-{h.hexdigest()[:16]}.npy") if cache else None
    if path and os.path.exists(path):
        tm = np.load(path)
        if tm.shape == (len(chains), len(chains)):
            return tm
    n = len(chains)
    tm = np.eye(n)
    for i in range(n):
        a = chains[i].backbone
        for j in range(i + 1, n):
            b = chains[j].backbone
            r = tmtools.tm_align(a.ca, b.ca, _clean(a.sequence), _clean(b.sequence))
            tm[i, j], tm[j, i] = r.tm_norm_chain1, r.tm_norm_chain2
    if path:
        os.makedirs(cache, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, tm)
        os.replace(tmp, path)
    return tm


def search_figures(score: np.ndarray, tm: np.ndarray) -> dict[str, float]:
    """Spearman of score with TM (mean of both normalisations) over all pairs i < j; top-hit
    success: the fraction of queries whose best-scoring other chain has TM > 0.5 (normalised by
    the query), among the queries that have such a chain; mean TM of the top hits over all
    queries."""
    from scipy.stats import spearmanr

    n = len(score)
    iu = np.triu_indices(n, 1)
    sym = (tm + tm.T) / 2
    s = score.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    top = s.argmax(axis=1)
    off = tm.copy()
    np.fill_diagonal(off, 0)
    answerable = off.max(axis=1) > TM_HIT
    hits = tm[np.arange(n), top] > TM_HIT
    return {
        "rho": float(spearmanr(score[iu], sym[iu])[0]),
        "top_hit": float(hits[answerable].mean()) if answerable.any() else float("nan"),
        "answerable": int(answerable.sum()),
        "top_tm": float(tm[np.arange(n), top].mean()),
        "best_tm": float(off.max(axis=1).mean()),
    }


# ============================================================================ efficiency


def efficiency(codes: np.ndarray, size: int) -> dict[str, float]:
    """Utilisation (distinct codes used / codebook size) and perplexity exp(H) of codes."""
    counts = np.bincount(np.asarray(codes).ravel(), minlength=size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "size": int(size),
            "utilisation": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}  # fmt: skip


def cosine_stats(vectors: np.ndarray | None) -> dict[str, float] | None:
    """Mean and max off-diagonal cosine similarity between code vectors."""
    if vectors is None:
        return None
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norm > 0, norm, 1)
    c = v @ v.T
    off = ~np.eye(len(v), dtype=bool)
    return {"mean": float(c[off].mean()), "max": float(c[off].max()), "dim": int(v.shape[1])}


# ============================================================================ run


@dataclass
class Run:
    probe: list[Chain]
    pairs: list
    search: list[Chain]
    sources: list[Source] = field(default_factory=list)
    results: dict = field(default_factory=dict)


def encode_sets(src: Source, run: Run) -> dict:
    """Per set, per protein id: the (L, C) token columns (and grids for grid tokenizers)."""
    t0 = time.perf_counter()
    out = {}
    for key, bbs, ids in (
        ("probe", [c.backbone for c in run.probe], [c.id for c in run.probe]),
        ("unbound", [p[1] for p in run.pairs], [p[0] for p in run.pairs]),
        ("bound", [p[2] for p in run.pairs], [p[0] for p in run.pairs]),
        ("search", [c.backbone for c in run.search], [c.id for c in run.search]),
    ):
        feats, grids = src.encode(bbs)
        for bb, f in zip(bbs, feats, strict=True):
            if len(f) != len(bb):
                raise RuntimeError(f"{src.name}: {len(f)} tokens for {len(bb)} residues")
        out[key] = dict(zip(ids, feats, strict=True))
        if grids is not None:
            out[key + "_grids"] = dict(zip(ids, grids, strict=True))
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate(run: Run, args) -> dict:
    res: dict = {"rows": [], "sources": {}}
    matched_codes: dict[str, list] = {}
    for src in run.sources:
        print(f"[{src.name}] encoding", flush=True)
        enc = encode_sets(src, run)
        test_ids = [c.id for c in run.probe if c.split == "test"]
        eff = []
        for c, size in enumerate(src.sizes):
            if src.kind == "grid":
                codes = np.concatenate([enc["probe_grids"][i][c].ravel() for i in test_ids])
            else:
                codes = np.concatenate([enc["probe"][i][:, c] for i in test_ids])
            eff.append(efficiency(codes, size))
        res["sources"][src.name] = {
            "kind": src.kind, "note": src.note, "checkpoint": src.checkpoint,
            "encode_seconds": enc["seconds"],
            "efficiency": eff, "cosine": [cosine_stats(v) for v in src.vectors],
        }  # fmt: skip
        matched_codes[src.name] = enc
        for view in views_of(src):
            t0 = time.perf_counter()
            row: dict = {"label": view.label, "source": src.name, "columns": view.columns}
            print(f"[{view.label}] probes", flush=True)
            row["probe_w0"] = probe_scores(view, enc["probe"], run.probe, 0)
            row["probe_w"] = probe_scores(view, enc["probe"], run.probe, args.window)
            print(f"[{view.label}] sensitivity", flush=True)
            row["sensitivity"] = sensitivity(view, enc["unbound"], enc["bound"], run.pairs)
            if view.search:
                print(f"[{view.label}] search", flush=True)
                row["search"] = search_rows(view, enc, run, args)
            row["seconds"] = time.perf_counter() - t0
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    return res


def search_rows(view: View, enc: dict, run: Run, args) -> dict:
    """Search figures of a view (and, for 3Di, of the derived-matrix variant)."""
    import biotite.sequence.align as balign

    if "tm" not in run.results:
        run.results["tm"] = tm_matrix(run.search, args.cache)
    tm = run.results["tm"]
    ids = [c.id for c in run.search]
    src = view.source
    out = {}
    if src.name == "aa":
        m = balign.SubstitutionMatrix.std_protein_matrix()
        letters = "".join(str(s) for s in m.get_alphabet1())
        lut = np.array([letters.index(a) for a in AA + "X"])
        mat = m.score_matrix()
        seqs = [lut[enc["search"][i][:, 0]] for i in ids]
        out["matrix"] = "BLOSUM62"
        out.update(search_figures(align_scores_biotite(seqs, mat), tm))
        return out
    # matched residues of BM5 and background residues of the probe set, for derived matrices
    a = np.concatenate([enc["unbound"][p[0]][p[3]][:, view.columns] for p in run.pairs])
    b = np.concatenate([enc["bound"][p[0]][p[4]][:, view.columns] for p in run.pairs])
    bg = np.concatenate([enc["probe"][c.id][:, view.columns] for c in run.probe
                         if c.split == "train"])  # fmt: skip
    if src.name == "3Di":
        m = balign.SubstitutionMatrix.std_3di_matrix()
        letters = "".join(str(s).upper() for s in m.get_alphabet1())
        lut = np.array([letters.index(c) for c in src.letters])
        seqs = [lut[enc["search"][i][:, 0]] for i in ids]
        out["matrix"] = "Foldseek 3Di"
        out.update(search_figures(align_scores_biotite(seqs, m.score_matrix()), tm))
        vec = src.vectors[0]
        edges, scores = distance_log_odds(vec, (a[:, 0], b[:, 0]), bg[:, 0])
        mat = substitution_matrix(vec, edges, scores)
        seqs = [enc["search"][i][:, 0] for i in ids]
        out["derived"] = search_figures(align_scores_biotite(seqs, mat), tm)
        out["derived"]["scores"] = scores.round(2).tolist()
        return out
    if len(view.columns) == 1:
        vec = view.vectors()
        if vec is None:
            return {"matrix": "none (no code vectors)"}
        edges, scores = distance_log_odds(vec, (a[:, 0], b[:, 0]), bg[:, 0])
        mat = substitution_matrix(vec, edges, scores)
        seqs = [enc["search"][i][:, 0] for i in ids]
        out["matrix"] = "derived from code vectors"
        out["scores"] = scores.round(2).tolist()
        out.update(search_figures(align_scores_biotite(seqs, mat), tm))
        return out
    vecs = [src.vectors[c] for c in view.columns]
    if any(v is None for v in vecs):
        return {"matrix": "none (no code vectors)"}

    def summed(t):
        return sum(v[t[:, k]] for k, v in enumerate(vecs))

    vs = [summed(enc["search"][i][:, view.columns]) for i in ids]
    # distances of summed vectors: matched and background pairs through a lookup of rows
    both = np.concatenate([summed(a), summed(b), summed(bg)])
    n = len(a)
    edges, scores = distance_log_odds(both, (np.arange(n), np.arange(n, 2 * n)),
                                      np.arange(2 * n, len(both)))  # fmt: skip
    out["matrix"] = "derived from summed code vectors (position-specific)"
    out["scores"] = scores.round(2).tolist()
    out.update(search_figures(align_scores_dense(vs, edges, scores), tm))
    return out


# ============================================================================ table


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def render(res: dict, meta: dict) -> str:
    n = meta["counts"]
    lines = [
        "# What the tokens know: token probes",
        "",
        "Generated by `benchmarks/token_probes.py` (do not edit by hand):",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"({meta['date']}, {meta['machine']}; {meta['seconds'] / 60:.1f} min in all, "
        f"{meta.get('cpu_seconds', 0) / 60:.1f} CPU-min in this process.) "
        "StructTokenBench-style measures (Yuan et al. 2025) beside reconstruction, for our "
        "tokenizers, Foldseek's 3Di alphabet (`mini3di`) and the amino-acid sequence, on the "
        "same proteins:",
        "",
        f"- **Effectiveness** (SS3, SS8: accuracy; CN: Spearman of predicted and true contact "
        f"number): a linear probe on frozen one-hot tokens (the token alone, and +-{meta['window']}"
        f" neighbours), trained on {n['probe_train']} ProMod3 chains and scored on "
        f"{n['probe_test']} others ({n['probe_test_residues']} residues), split by PDB id (one "
        "chain per PDB entry, entries drawn by md5 of the PDB id). The tokenizers may have seen "
        "these chains in training (a tokenizer trained on ProMod3); the probe split itself is "
        f"by PDB id. Majority class: SS3 {_f(meta['majority']['ss3'])}, SS8 "
        f"{_f(meta['majority']['ss8'])}.",
        f"- **Sensitivity**: {n['pairs']} BM5 bound/unbound pairs of one chain "
        f"({n['pair_residues']} residues compared; the bundled tokenizers were trained on BM5). "
        "Residue rho: Spearman of token disagreement with 1 - lDDT_i (the local change); "
        "protein rho: Spearman of token identity with the pair's TM-score (median TM "
        f"{_f(meta['pair_tm_median'])}: mostly small changes). Changed: fraction of residues "
        "whose token differs, over all matched residues and over the static ones (1 - lDDT_i < "
        "0.05). Residues within 3 of a missing residue of either file or of a chain end are left "
        "out. Amino acids differ only where the two files' sequences do.",
        f"- **Search**: all {n['search_pairs']} pairs of {n['search']} held-out chains "
        "(`configs/heldout.tsv`, never trained on), Smith-Waterman scores (biotite, gap open "
        f"{GAP_OPEN}, extend {GAP_EXTEND}) against TM-align: rho over all pairs, and top hit "
        f"with TM > {TM_HIT} among the {n['answerable']} queries that have such a chain in the "
        "set. Matrices: BLOSUM62 (aa), Foldseek's (3Di), and for code vectors a log-odds score "
        "of the code-vector distance estimated on BM5 matched residues (`3Di (derived)` applies "
        "that recipe to 3Di's centroids).",
        "- **Efficiency / distinctiveness**: codes used / codebook size and perplexity on the "
        "ProMod3 test split (per stage or level, ` / `-separated, coarsest level first); mean "
        "and max off-diagonal cosine similarity of the code vectors (all codes; compare within "
        "a dimension only: 2-D centroids are more alike by cosine than 4-D or 64-D vectors).",
        "",
        "| tokenizer | SS3 | SS8 | CN rho | SS3 +-w | SS8 +-w | CN rho +-w | sens. residue rho "
        "| sens. protein rho | changed (all / static) | search rho | top hit TM>0.5 | used / size "
        "| perplexity | cos mean / max | proteins (probe / pairs / search) |",
        "|" + "---|" * 16,
    ]
    counts = f"{n['probe']} / {n['pairs']} / {n['search']}"
    for row in res["rows"]:
        src = res["sources"][row["source"]]
        p0, pw, se = row["probe_w0"], row["probe_w"], row["sensitivity"]
        sr = row.get("search") or {}
        effs = [src["efficiency"][c] for c in row["columns"]]
        coss = [src["cosine"][c] for c in row["columns"]]
        used = " / ".join(f"{e['used']}/{e['size']}" for e in effs)
        ppl = " / ".join(f"{e['perplexity']:.0f}" for e in effs)
        cos = " / ".join("n/a" if c is None else f"{c['mean']:.2f}/{c['max']:.2f}" for c in coss)
        srho = _f(sr.get("rho")) if "rho" in sr else "-"
        hit = _f(sr.get("top_hit"), 2) if "top_hit" in sr else "-"
        lines.append(
            f"| {row['label']} | {_f(p0['ss3'])} | {_f(p0['ss8'])} | {_f(p0['cn'])} "
            f"| {_f(pw['ss3'])} | {_f(pw['ss8'])} | {_f(pw['cn'])} | {_f(se['residue_rho'])} "
            f"| {_f(se['protein_rho'])} | {_f(se['changed'], 2)} / "
            f"{_f(se.get('changed_static'), 2)} | {srho} | {hit} | {used} "
            f"| {ppl} | {cos} | {counts} |"
        )
        if "derived" in sr:
            d = sr["derived"]
            lines.append(
                f"| {row['label']} (derived) | | | | | | | | | | {_f(d['rho'])} "
                f"| {_f(d['top_hit'], 2)} | | | | {counts} |"
            )
    lines += ["", "## What it says", "", *meta["summary"], ""]
    return "\n".join(lines)


#: What a measure suggests when 3Di or the amino acids beat every one of our rows.
SUGGESTS = {
    "ss": "a linear read-out of our codes holds less secondary structure than {who}: the "
    "reconstruction loss does not ask a code to name its residue's local state, and with "
    "thousands of codes each is seen rarely by the probe; a language model on our tokens has "
    "to recover the local state from context",
    "cn": "our codes say less about burial (how many residues pack around a residue) than {who}",
    "sens": "{who} changes where the local structure changes more faithfully than ours; ours "
    "also change at residues whose structure did not (the static-change column), so a "
    "token difference is weak evidence of a structural one",
    "search": "aligned token sequences rank folds less well with our codes than with {who}: "
    "codes of corresponding residues in similar folds are less conserved than 3Di letters, "
    "and our matrix is derived from code-vector distances rather than trained on structural "
    "alignments; for search, 3Di (with its matrix) remains the better alphabet",
}


#: What a measure suggests when one of our rows leads.
LEADS = {
    "cn": ": a code is made from its residue's whole row of the image (all its distances), so "
    "it knows how many residues pack around it, which a local alphabet does not",
    "sens": ": our tokens change with the structure (and the whole protein's token identity "
    "follows its TM-score), though they also change where the structure did not",
    "search": ": a substitution matrix derived from code-vector distances ranks pairs of folds "
    "as well as 3Di's trained matrix does over these chains; it says nothing of speed, and "
    "the top-hit column is the stricter test",
}


def summarise(res: dict, majority: dict) -> list[str]:
    """Sentences comparing our best row with 3Di and the amino acids, measure by measure, and
    what it suggests where they beat every one of our rows."""
    rows = {r["label"]: r for r in res["rows"]}
    ours = [r["label"] for r in res["rows"] if r["source"] not in ("aa", "3Di")]
    measures = [
        ("SS3 accuracy, token alone", "ss", lambda r: r["probe_w0"]["ss3"]),
        ("SS3 accuracy, window", "ss", lambda r: r["probe_w"]["ss3"]),
        ("SS8 accuracy, token alone", "ss", lambda r: r["probe_w0"]["ss8"]),
        ("SS8 accuracy, window", "ss", lambda r: r["probe_w"]["ss8"]),
        ("contact-number rho, token alone", "cn", lambda r: r["probe_w0"]["cn"]),
        ("contact-number rho, window", "cn", lambda r: r["probe_w"]["cn"]),
        ("per-residue sensitivity rho", "sens", lambda r: r["sensitivity"]["residue_rho"]),
        ("per-protein sensitivity rho", "sens", lambda r: r["sensitivity"]["protein_rho"]),
        ("search rho", "search", lambda r: (r.get("search") or {}).get("rho")),
        ("search top hit", "search", lambda r: (r.get("search") or {}).get("top_hit")),
    ]
    out = []
    for name, key, get in measures:
        vals = {k: get(r) for k, r in rows.items()}
        vals = {k: float(v) for k, v in vals.items() if v is not None and np.isfinite(v)}
        mine = [k for k in ours if k in vals]
        if not mine:
            continue
        best = max(mine, key=vals.get)
        parts = [f"{k} {_f(vals[k])}" for k in ("3Di", "aa") if k in vals]
        text = f"- {name}: ours at best {best} {_f(vals[best])}; " + ", ".join(parts)
        if name.startswith("SS3") and "ss3" in majority:
            text += f" (majority class {_f(majority['ss3'])})"
        beaters = [k for k in ("3Di", "aa") if k in vals and vals[k] > vals[best]]
        if beaters:
            who = " and ".join("the amino-acid sequence" if k == "aa" else k for k in beaters)
            text += f". **{who} beat{'s' if len(beaters) == 1 else ''} every one of our rows**: "
            text += SUGGESTS[key].format(who=who)
        else:
            text += ". Ours lead here" + LEADS.get(key, "")
        out.append(text + ".")
    static = {k: r["sensitivity"].get("changed_static") for k, r in rows.items()}
    static = {k: v for k, v in static.items() if v is not None and np.isfinite(v)}
    if static:
        out.append(
            "- Token stability: fraction of residues whose token changed between the bound and "
            "unbound structure although their local structure did not (1 - lDDT_i < 0.05): "
            + ", ".join(f"{k} {_f(v, 2)}" for k, v in static.items())
            + "."
        )
    return out


CARD_START, CARD_END = "<!-- token-probes:start -->", "<!-- token-probes:end -->"


def card_section(name: str, checkpoint: str, results: dict) -> str:
    """The model card's "What the tokens know" section for bundled tokenizer ``name``: its rows
    of ``results`` (the JSON this script writes) beside 3Di and the amino acids, or "" when
    the results are of another checkpoint (a stale table is never quoted)."""
    src = results["sources"].get(name)
    if not src or src.get("checkpoint") != checkpoint:
        return ""
    rows = [r for r in results["rows"] if r["source"] in (name, "3Di", "aa")]
    n = results["meta"]["counts"]
    lines = [
        CARD_START,
        "## What the tokens know",
        "",
        "From `docs/token_probes.md` (generated by `benchmarks/token_probes.py`; read its text "
        "for the methods): linear probes of secondary structure on frozen tokens "
        f"({n['probe_train']} / {n['probe_test']} ProMod3 chains, split by PDB id; the "
        "tokenizer may have seen them in training), token changes between "
        f"{n['pairs']} BM5 bound/unbound pairs, and search among {n['search']} held-out "
        "chains (Smith-Waterman against TM-align).",
        "",
        "| tokens | SS3 | SS8 +-w | sens. residue rho | changed at static residues | search rho "
        "| top hit TM>0.5 | codes used | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff = [results["sources"][r["source"]]["efficiency"][c] for c in r["columns"]]
        used = " / ".join(f"{e['used']}/{e['size']}" for e in eff)
        ppl = " / ".join(f"{e['perplexity']:.0f}" for e in eff)
        sr = r.get("search") or {}
        srho = _f(sr.get("rho")) if "rho" in sr else "-"
        hit = _f(sr.get("top_hit"), 2) if "top_hit" in sr else "-"
        se = r["sensitivity"]
        lines.append(
            f"| {r['label']} | {_f(r['probe_w0']['ss3'])} | {_f(r['probe_w']['ss8'])} "
            f"| {_f(se['residue_rho'])} | {_f(se.get('changed_static'), 2)} | {srho} | {hit} "
            f"| {used} | {ppl} |"
        )
    lines += ["", *results["meta"]["summary"], CARD_END]
    return "\n".join(lines)


def update_card(path: str, section: str) -> bool:
    """Put ``section`` into the model card at ``path`` (replacing an earlier one, else before
    "## Limitations", else at the end). Returns whether the card changed."""
    with open(path) as fh:
        text = fh.read()
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        new = head + section + rest.split(CARD_END, 1)[1]
    elif "\n## Limitations" in text:
        head, rest = text.split("\n## Limitations", 1)
        new = head + "\n" + section + "\n\n## Limitations" + rest
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    if new != text:
        with open(path, "w") as fh:
            fh.write(new)
    return new != text


def write_cards(tokenizers: Sequence[str], results: dict) -> None:
    """Update the model card of every bundled tokenizer among ``tokenizers``."""
    from protoken import pretrained

    folder = os.path.join(ROOT, "src", "protoken", "resources", "pretrained")
    for name in tokenizers:
        path = os.path.join(folder, f"{name}.md")
        if not pretrained.is_name(name) or not os.path.exists(path):
            continue
        section = card_section(name, results["sources"][name]["checkpoint"], results)
        if section and update_card(path, section):
            print(f"updated {path}")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", action="append", help="bundled name or checkpoint path "
                   "(repeatable; default: residue and default)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a CI-sized run (seconds, not minutes)")
    p.add_argument("--promod3", default=os.path.join(SHARED, "promod3"))
    p.add_argument("--train", default=os.path.join(SHARED, "train"), help="BM5 folder")
    p.add_argument("--structures", default=os.path.join(SHARED, "structures"))
    p.add_argument("--probe-chains", type=int, default=300)
    p.add_argument("--pairs", type=int, default=150)
    p.add_argument("--search", type=int, default=0, help="held-out chains (0: all <= max-len)")
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--window", type=int, default=3, help="probe window half-width")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "protoken-probes"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "token_probes.md"))
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "token_probes.json"))
    p.add_argument("--cards", action="store_true", help="also put the results into the model "
                   "cards of the bundled tokenizers that were run")  # fmt: skip
    p.add_argument("--from-json", metavar="JSON", help="only redraw --out (and the cards with "
                   "--cards) from the results of an earlier run")  # fmt: skip
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            results = json.load(fh)
        results["meta"]["summary"] = summarise(results, results["meta"]["majority"])
        _write(args.out, render(results, results["meta"]))
        if args.cards:
            write_cards(list(results["sources"]), results)
        return 0
    if args.quick:
        args.probe_chains, args.pairs, args.search = 24, 6, 12
        args.max_len = min(args.max_len, 200)
    tokenizers = args.tokenizer or ["residue", "default"]
    t0 = time.perf_counter()
    print("reading proteins", flush=True)
    run = Run(
        probe=promod3_chains(args.promod3, args.probe_chains, 40, args.max_len),
        pairs=bm5_pairs(args.train, args.pairs, args.max_len),
        search=heldout_chains(args.structures, args.max_len, args.search or None),
    )
    run.sources = [aa_source(), mini3di_source()]
    run.sources += [tokenizer_source(t, run.probe[0].backbone) for t in tokenizers]
    res = evaluate(run, args)
    tm = run.results["tm"]
    off = tm.copy()
    np.fill_diagonal(off, 0)
    seconds = time.perf_counter() - t0
    cmd = "python benchmarks/token_probes.py " + " ".join(
        [f"--tokenizer {t}" for t in tokenizers] + (["--quick"] if args.quick else [])
    )
    test = [c for c in run.probe if c.split == "test"]
    meta = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"CPU, {os.cpu_count()} cores (shared)",
        "seconds": seconds,
        "cpu_seconds": time.process_time(),
        "window": args.window,
        "probe": "linear (L-BFGS logistic / ridge, l2 1)",
        "counts": {
            "probe": len(run.probe),
            "probe_train": len(run.probe) - len(test),
            "probe_test": len(test),
            "probe_test_residues": int(sum(len(c.dssp) for c in test)),
            "pairs": len(run.pairs),
            "pair_residues": res["rows"][0]["sensitivity"]["residues"],
            "search": len(run.search),
            "search_pairs": len(run.search) * (len(run.search) - 1) // 2,
            "answerable": int((off.max(axis=1) > TM_HIT).sum()),
        },
        "majority": majority_baseline(run.probe),
        "pair_tm_median": float(
            np.median([r["sensitivity"]["tm_median"] for r in res["rows"]][:1])
        ),  # fmt: skip
        "splits": {
            "probe_train": [c.id for c in run.probe if c.split == "train"],
            "probe_test": [c.id for c in test],
            "pairs": [p[0] for p in run.pairs],
            "search": [c.id for c in run.search],
        },
    }
    meta["summary"] = summarise(res, meta["majority"])
    res.pop("tm", None)
    text = render(res, meta)
    _write(args.out, text)
    _write(args.json, json.dumps({"meta": meta, **res}, indent=1))
    print(text)
    print(f"wrote {args.out} and {args.json} in {seconds:.0f} s")
    if args.cards:
        write_cards(tokenizers, {"meta": meta, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
