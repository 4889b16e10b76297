"""Superposition and structure metrics against known geometry and TM-align (tmtools)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import random_rotation
from protoken.metrics import (
    d0,
    distance_mae,
    kabsch,
    lddt,
    mirror_rmsd,
    rmsd,
    superpose,
    tm_score,
)
from protoken.structure import read_backbones


@pytest.fixture(scope="module")
def ca(structures_dir) -> np.ndarray:
    """CA trace of a real SCOPe domain (d1asha_, 147 residues)."""
    return read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0].ca


def test_kabsch_recovers_a_known_rigid_motion(ca):
    rng = np.random.default_rng(0)
    rot, shift = random_rotation(rng), np.array([10.0, -3.0, 7.5])
    moved = ca @ rot.T + shift
    r, t = kabsch(ca, moved)
    np.testing.assert_allclose(r, rot, atol=1e-10)
    np.testing.assert_allclose(t, shift - (rot - r) @ ca.mean(0), atol=1e-8)
    np.testing.assert_allclose(superpose(ca, moved), moved, atol=1e-9)
    assert rmsd(ca, moved) < 1e-9
    assert rmsd(ca, moved, superpose=False) == pytest.approx(
        np.sqrt(np.mean(np.sum((ca - moved) ** 2, axis=1)))
    )


def test_kabsch_never_reflects(ca):
    """A mirror image cannot be superposed: det R = +1 and the RMSD stays large, while the
    explicit mirror diagnostic finds the perfect (improper) fit."""
    rng = np.random.default_rng(1)
    mirror = ca * np.array([-1.0, 1.0, 1.0]) @ random_rotation(rng).T
    r, _ = kabsch(mirror, ca)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert rmsd(mirror, ca) > 5.0
    assert mirror_rmsd(mirror, ca) < 1e-9
    assert tm_score(mirror, ca) < 0.5


def test_weighted_kabsch_fits_only_the_weighted_points(ca):
    rng = np.random.default_rng(2)
    rot = random_rotation(rng)
    target = ca @ rot.T
    mobile = ca.copy()
    mobile[100:] += rng.normal(size=(len(ca) - 100, 3)) * 5.0  # spoil the last residues
    w = np.zeros(len(ca))
    w[:100] = 1.0
    moved = superpose(mobile, target, weights=w)
    np.testing.assert_allclose(moved[:100], target[:100], atol=1e-9)


def test_d0_formula():
    assert d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)
    assert d0(20) == 0.5
    assert d0(22) >= 0.5


def test_tm_score_of_a_split_protein_is_the_analytic_value(ca):
    """Half the residues translated 100 A away: the search must superpose on the larger half,
    giving TM = (n1 + n2 / (1 + (100 / d0)^2)) / L exactly."""
    length = len(ca)
    n1 = 90
    model = ca.copy()
    model[n1:] += np.array([100.0, 0.0, 0.0])
    rng = np.random.default_rng(3)
    model = model @ random_rotation(rng).T + 20.0
    expected = (n1 + (length - n1) / (1.0 + (100.0 / d0(length)) ** 2)) / length
    assert tm_score(model, ca) == pytest.approx(expected, abs=1e-9)
    assert tm_score(ca, ca) == pytest.approx(1.0)
    assert tm_score(ca, ca, superpose=False) == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_tm_score_search_matches_tm_align_on_a_fixed_alignment(ca, sigma):
    """Our superposition search against TM-align's own (tmtools, alignment given as identity),
    an independent implementation."""
    import tmtools

    rng = np.random.default_rng(4)
    noisy = ca @ random_rotation(rng).T + rng.normal(size=ca.shape) * sigma
    seq = "A" * len(ca)
    ref = tmtools.tm_align(noisy, ca, seq, seq, [seq, seq]).tm_norm_chain2
    assert tm_score(noisy, ca) == pytest.approx(ref, abs=2e-3)
    # with the optimal rotation applied, scoring without search cannot beat the search
    assert tm_score(superpose(noisy, ca), ca, superpose=False) <= tm_score(noisy, ca) + 1e-12


def test_tm_score_align_mode_is_sequence_independent(ca):
    rng = np.random.default_rng(5)
    moved = ca @ random_rotation(rng).T
    assert tm_score(moved, ca, align=True) == pytest.approx(1.0, abs=1e-6)
    # a fragment aligned against the whole protein: normalised by the reference length
    frag = moved[20:100]
    score = tm_score(frag, ca, align=True)
    assert 80 / len(ca) - 0.02 < score <= 80 / len(ca) + 1e-6


def test_lddt_on_known_geometry():
    """Four points on a line 5 A apart; the last moved out by 1.5 A. Pairs within 15 A:
    (0,1), (0,2), (1,2) unchanged; (1,3), (2,3) off by 1.5 A, inside 2 and 4 A only."""
    ref = np.array([[0.0, 0, 0], [5.0, 0, 0], [10.0, 0, 0], [15.0, 0, 0]])
    pred = ref.copy()
    pred[3, 0] += 1.5
    assert lddt(pred, ref) == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)
    np.testing.assert_allclose(
        lddt(pred, ref, per_residue=True), [1.0, 2.5 / 3, 2.5 / 3, 0.5], atol=1e-12
    )
    assert lddt(ref, ref) == 1.0
    assert lddt(pred, ref, cutoff=100.0) < lddt(pred, ref)  # (0,3) now counts, also off


def test_lddt_is_superposition_free(ca):
    rng = np.random.default_rng(6)
    moved = ca @ random_rotation(rng).T + 50.0
    assert lddt(moved, ca) == 1.0
    noisy = ca + rng.normal(size=ca.shape) * 0.5
    assert lddt(noisy @ random_rotation(rng).T, ca) == pytest.approx(lddt(noisy, ca))
    assert 0.5 < lddt(noisy, ca) < 1.0


def test_bad_inputs_raise():
    a = np.zeros((5, 3))
    with pytest.raises(ValueError):
        rmsd(a, np.zeros((6, 3)))
    with pytest.raises(ValueError):
        rmsd(np.zeros((5, 2)), np.zeros((5, 2)))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        tm_score(bad, a)


def test_distance_mae_reads_distances_from_the_lower_triangle():
    rng = np.random.default_rng(2)
    truth = rng.uniform(-1, 1, size=(3, 6, 6))
    decoded = truth.copy()
    lower = np.tri(6, k=-1, dtype=bool)
    decoded[0][lower] += 0.01  # 0.01 in image units is 0.4 A at dmax 80
    decoded[0][~lower] += 0.5  # omega, the diagonal and the other channels do not count
    decoded[1:] -= 0.3
    assert distance_mae(truth, decoded, 80.0) == pytest.approx(0.4)
    # decoded values are clipped to [-1, 1] first: 3 past the top reads as dmax
    far = truth.copy()
    far[0, 5, 0] = 3.0
    expected = (1.0 - truth[0, 5, 0]) / 2 * 80.0 / 15
    assert distance_mae(truth, far, 80.0) == pytest.approx(expected)
    # batches pool every valid pair; the mask leaves out padding
    batch_t, batch_d = np.stack([truth, truth]), np.stack([decoded, truth])
    mask = np.zeros((2, 6, 6), dtype=bool)
    mask[0, :4, :4] = mask[1] = True
    assert distance_mae(batch_t, batch_d, 80.0, mask) == pytest.approx(0.4 * 6 / (6 + 15))
    assert distance_mae(truth[:, :1, :1], decoded[:, :1, :1], 80.0) == 0.0
    with pytest.raises(ValueError):
        distance_mae(truth, decoded[:, :5, :5], 80.0)


# --------------------------------------------------------------------------- complexes


def _complex_atoms(structures_dir, name):
    from protoken.geometry import virtual_cb

    (bb,) = read_backbones(structures_dir / name, chains="complex", models="first")
    atoms = {"N": bb.n, "CA": bb.ca, "C": bb.c, "CB": virtual_cb(bb.n, bb.ca, bb.c)}
    return bb, atoms


def _moved(atoms, rows, shift):
    out = {k: v.copy() for k, v in atoms.items()}
    for v in out.values():
        v[rows] += shift
    return out


def _min_distances(atoms, a, b):
    """(|a|, |b|): the smallest distance between any atoms of residue i of ``a`` and j of ``b``."""
    xa = np.stack([atoms[k][a] for k in atoms], axis=1)  # (na, atoms, 3)
    xb = np.stack([atoms[k][b] for k in atoms], axis=1)
    d = np.linalg.norm(xa[:, None, :, None] - xb[None, :, None, :], axis=-1)
    return d.min(axis=(2, 3))


def test_dockq_of_a_complex_against_itself_is_one_and_a_shifted_chain_scores_lower(
    structures_dir,
):
    """DockQ (the DockQ package) on a real heterodimer, checked against values computed here:
    a partner moved by 3 A has ligand RMSD 3 A, fnat the fraction of native contacts (atoms
    within 5 A) kept, interface RMSD the Kabsch RMSD of the interface's N, CA, C (residues
    within 10 A of the partner), and DockQ = (fnat + 1/(1+(irmsd/1.5)^2) +
    1/(1+(lrmsd/8.5)^2)) / 3. The shifted complex is scored first: a result DockQ memoised
    must not leak into the next call."""
    from protoken.metrics import complex_scores

    bb, atoms = _complex_atoms(structures_dir, "biotite__5zng.pdb.gz")
    (ca_id, na), (cc_id, nc) = bb.chains
    a, c = np.arange(na), np.arange(na, na + nc)
    shifted = _moved(atoms, c, np.array([3.0, 0.0, 0.0]))
    s = complex_scores(shifted, atoms, bb.chains, bb.sequence)
    assert s["interfaces"] == 1 and list(s["interface_scores"]) == [f"{ca_id}/{cc_id}"]
    assert s["lrmsd"] == pytest.approx(3.0, abs=2e-3)  # PDB files hold 3 decimals
    native = _min_distances(atoms, a, c)
    model = _min_distances(shifted, a, c)
    contacts = native < 5.0
    assert s["fnat"] == pytest.approx((contacts & (model < 5.0)).sum() / contacts.sum())
    near = native < 10.0
    rows = np.concatenate([a[near.any(axis=1)], c[near.any(axis=0)]])
    interface = [np.concatenate([x[k][rows] for k in ("N", "CA", "C")]) for x in (shifted, atoms)]
    assert s["irmsd"] == pytest.approx(rmsd(*interface), abs=2e-3)
    formula = (s["fnat"] + 1 / (1 + (s["irmsd"] / 1.5) ** 2) + 1 / (1 + (3.0 / 8.5) ** 2)) / 3
    assert s["dockq"] == pytest.approx(formula, abs=1e-3)
    assert 0.5 < s["dockq"] < 0.95
    # each chain is intact: per-chain TM-scores 1, the complex's lower
    assert s["chain_tm_scores"] == {ca_id: pytest.approx(1.0), cc_id: pytest.approx(1.0)}
    assert s["complex_tm_score"] < 0.95

    same = complex_scores(atoms, atoms, bb.chains, bb.sequence)
    assert same["dockq"] == pytest.approx(1.0) and same["fnat"] == 1.0
    assert same["irmsd"] < 1e-3 and same["lrmsd"] < 1e-3
    assert same["complex_tm_score"] == pytest.approx(1.0)


def test_complex_tm_score_is_the_analytic_value_when_a_chain_is_far_away(structures_dir):
    """The 4hhb tetramer with chain D moved 100 A: the best superposition is the other three
    chains' own, so TM = (L_ABC + sum_D 1 / (1 + (100 / d0)^2)) / L with d0 of the whole
    length; every chain alone still scores 1."""
    from protoken.metrics import complex_scores

    bb, atoms = _complex_atoms(structures_dir, "graphein__4hhb.cif.gz")
    n_d = bb.chains[-1][1]
    far = _moved(atoms, np.arange(len(bb) - n_d, len(bb)), np.array([0.0, 100.0, 0.0]))
    s = complex_scores(far, atoms, bb.chains, dockq=False)
    length = len(bb)
    expected = (length - n_d + n_d / (1 + (100.0 / d0(length)) ** 2)) / length
    assert s["complex_tm_score"] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(428 / 574, abs=2e-3)
    assert s["chain_tm_min"] == pytest.approx(1.0) and "dockq" not in s


def test_complex_scores_refuse_what_they_cannot_score(structures_dir):
    from protoken.metrics import complex_scores

    bb, atoms = _complex_atoms(structures_dir, "biotite__5zng.pdb.gz")
    with pytest.raises(ValueError, match="does not cover"):
        complex_scores(atoms, atoms, [("A", 10)])
    cb_only = {"CB": atoms["CB"]}
    with pytest.raises(ValueError, match="DockQ needs N, CA and C"):
        complex_scores(cb_only, cb_only, bb.chains)
    assert complex_scores(cb_only, cb_only, bb.chains, dockq=False)["complex_tm_score"] == 1.0
