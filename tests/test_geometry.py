"""6D geometry against known geometry and a plain, loop-based implementation of the reference
design, and the pair helpers shared with the way back (distances, omega, CA directions)."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest

from helpers import random_rotation
from protoken.geometry import (
    angle,
    ca_directions,
    cross,
    dihedral,
    omega_parts,
    pairwise_distances,
    sixd,
    virtual_cb,
)
from protoken.structure import read_backbones


def plain_dihedral(p0, p1, p2, p3) -> float:
    """Textbook dihedral, atan2(|b2| b1.(b2 x b3), (b1 x b2).(b2 x b3)) (Blondel & Karplus)."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    y = np.linalg.norm(b2) * np.dot(b1, np.cross(b2, b3))
    return math.atan2(float(y), float(np.dot(np.cross(b1, b2), np.cross(b2, b3))))


def plain_angle(p0, p1, p2) -> float:
    v, w = p0 - p1, p2 - p1
    return math.acos(max(-1.0, min(1.0, float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)))))


def plain_sixd(n, ca, c, dmax):
    """trRosetta's 6D features with explicit loops over residue pairs."""
    length = len(n)
    cb = np.empty((length, 3))
    for i in range(length):
        b, cc = ca[i] - n[i], c[i] - ca[i]
        a = np.cross(b, cc)
        cb[i] = -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca[i]
    d = np.full((length, length), dmax)
    omega, theta, phi = (np.zeros((length, length)) for _ in range(3))
    for i in range(length):
        for j in range(length):
            dij = float(np.linalg.norm(cb[j] - cb[i]))
            if i == j or dij >= dmax:
                continue
            d[i, j] = dij
            omega[i, j] = plain_dihedral(ca[i], cb[i], cb[j], ca[j])
            theta[i, j] = plain_dihedral(n[i], ca[i], cb[i], cb[j])
            phi[i, j] = plain_angle(ca[i], cb[i], cb[j])
    return d, omega, theta, phi


@pytest.fixture(scope="module")
def protein(structures_dir):
    """A real SCOPe domain (d1asha_, 147 residues)."""
    return read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]


def test_dihedral_and_angle_on_known_geometry():
    a, b, c = np.array([1.0, 0, 0]), np.array([0.0, 0, 0]), np.array([0.0, 1, 0])
    for deg in (-179.0, -120.0, -60.0, 0.0, 45.0, 90.0, 150.0):
        t = math.radians(deg)
        d = np.array([math.cos(t), 1.0, math.sin(t)])  # a rotated by t about the b-c axis
        assert abs(dihedral(a, b, c, d)) == pytest.approx(abs(t), abs=1e-12)
        assert dihedral(a, b, c, d) == pytest.approx(plain_dihedral(a, b, c, d), abs=1e-12)
    assert angle(a, b, c) == pytest.approx(math.pi / 2)
    assert angle(a, b, -a) == pytest.approx(math.pi)
    assert angle(a, b, 2 * a) == pytest.approx(0.0, abs=1e-7)


def test_dihedral_sign_matches_the_ramachandran_plot(structures_dir):
    """Backbone phi = dihedral(C_i-1, N_i, CA_i, C_i) is negative for most residues of a real
    protein (alpha helix about -60 degrees): the sign convention is the IUPAC one."""
    bb = read_backbones(structures_dir / "biotite__1aki.pdb")[0]
    phi = np.degrees(dihedral(bb.c[:-1], bb.n[1:], bb.ca[1:], bb.c[1:]))
    assert (phi < 0).mean() > 0.85
    assert -75 < np.median(phi) < -55


def test_virtual_cb_is_near_the_real_cb(structures_dir):
    """The seed's ideal Cb lies within ~0.2 A of the deposited Cb of non-glycine residues."""
    path = structures_dir / "biotite__1aki.pdb"
    st = gemmi.read_structure(str(path))
    rows = []
    for res in st[0][0]:
        atoms = {a.name: np.array(a.pos.tolist()) for a in res}
        if {"N", "CA", "C", "CB"} <= atoms.keys():
            rows.append([atoms["N"], atoms["CA"], atoms["C"], atoms["CB"]])
    x = np.array(rows)
    err = np.linalg.norm(virtual_cb(x[:, 0], x[:, 1], x[:, 2]) - x[:, 3], axis=1)
    assert len(x) > 100
    assert np.median(err) < 0.2 and err.max() < 0.6


def test_virtual_cb_geometry():
    """Ideal geometry: CA-CB 1.52 A, N-CA-CB ~110.5 deg, C-CA-CB ~110 deg, L-chirality."""
    n = np.array([1.458, 0.0, 0.0])
    ca = np.zeros(3)
    t = math.radians(111.2)
    c = 1.525 * np.array([math.cos(t), math.sin(t), 0.0])
    cb = virtual_cb(n, ca, c)
    assert np.linalg.norm(cb - ca) == pytest.approx(1.52, abs=0.03)
    assert math.degrees(plain_angle(n, ca, cb)) == pytest.approx(110.5, abs=1.5)
    assert math.degrees(plain_angle(c, ca, cb)) == pytest.approx(110.1, abs=1.5)
    # L-amino acid side: the improper N-C-CA-CB of deposited residues is about +126 degrees
    assert math.degrees(dihedral(n, c, ca, cb)) == pytest.approx(124, abs=8)


@pytest.mark.parametrize(
    "name,dmax", [("foldseek__d1asha_.pdb", 80.0), ("biotite__1aki.pdb", 20.0)]
)
def test_sixd_equals_a_plain_implementation(structures_dir, name, dmax):
    bb = read_backbones(structures_dir / name)[0]
    got = sixd(bb.n, bb.ca, bb.c, dmax=dmax)
    want = plain_sixd(bb.n, bb.ca, bb.c, dmax)
    for label, g, w in zip(("d", "omega", "theta", "phi"), got, want, strict=True):
        diff = np.abs(g - w)
        if label in ("omega", "theta"):  # +pi and -pi are the same angle
            diff = np.minimum(diff, 2 * np.pi - diff)
        assert diff.max() < 1e-6, label
    if dmax == 20.0:
        assert (got.d == 20.0).mean() > 0.3  # the cut-off really applies


def test_sixd_conventions(protein):
    f = sixd(protein.n, protein.ca, protein.c)
    assert np.all(np.diag(f.d) == 80.0)
    for a in (f.omega, f.theta, f.phi):
        assert np.all(np.diag(a) == 0.0)
    np.testing.assert_allclose(f.d, f.d.T)
    np.testing.assert_allclose(f.omega, f.omega.T, atol=1e-12)
    assert not np.allclose(f.theta, f.theta.T)
    assert f.phi.min() >= 0 and f.phi.max() <= np.pi
    assert np.abs(f.omega).max() <= np.pi and np.abs(f.theta).max() <= np.pi
    # neighbouring Cb in a folded protein: 4-7 A
    assert 3.5 < np.median(np.diag(f.d, 1)) < 7.0


def test_sixd_invariant_under_rotation_and_translation(protein):
    rng = np.random.default_rng(0)
    rot, shift = random_rotation(rng), rng.normal(scale=50.0, size=3)
    moved = protein.coords @ rot.T + shift
    a = sixd(protein.n, protein.ca, protein.c)
    b = sixd(moved[:, 0], moved[:, 1], moved[:, 2])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-9)


def test_mirror_image_flips_omega_and_theta_only(protein):
    """Mirroring every atom (Cb included) negates the dihedrals and keeps d and phi."""
    m = np.array([1.0, 1.0, -1.0])
    cb = virtual_cb(protein.n, protein.ca, protein.c)
    a = sixd(protein.n, protein.ca, protein.c)
    b = sixd(protein.n * m, protein.ca * m, protein.c * m, cb=cb * m)
    np.testing.assert_allclose(b.d, a.d, atol=1e-9)
    np.testing.assert_allclose(b.phi, a.phi, atol=1e-9)
    np.testing.assert_allclose(b.omega, -a.omega, atol=1e-9)
    np.testing.assert_allclose(b.theta, -a.theta, atol=1e-9)
    assert np.abs(a.omega).mean() > 0.5  # not trivially zero


def test_virtual_cb_of_a_mirrored_backbone_is_on_the_other_side(protein):
    """The Cb formula is chiral: a mirrored backbone gets a D-amino-acid Cb, not the mirror of
    the L one, so an image made from a mirrored structure file is not simply sign-flipped."""
    m = np.array([1.0, 1.0, -1.0])
    cb = virtual_cb(protein.n, protein.ca, protein.c)
    cb_m = virtual_cb(protein.n * m, protein.ca * m, protein.c * m)
    assert np.linalg.norm(cb_m - cb * m, axis=1).min() > 2.0


def test_sixd_handles_degenerate_input():
    """Coincident residues (duplicated atoms in a bad file) give finite features, never NaN."""
    x = np.zeros((4, 3, 3))
    x[:, 0] = [1.458, 0, 0]
    x[:, 2] = [-0.55, 1.42, 0]
    f = sixd(x[:, 0], x[:, 1], x[:, 2])
    assert all(np.isfinite(a).all() for a in f)


# --------------------------------------------------------------------------- pair helpers


def test_cross_and_pairwise_distances_match_numpy_and_loops():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 7, 5, 3))
    np.testing.assert_allclose(cross(a, b), np.cross(a, b), atol=1e-12)
    x = rng.normal(size=(60, 3)) * 30 + 500.0  # far from the origin: centring matters
    want = np.array([[np.linalg.norm(p - q) for q in x] for p in x])
    d = pairwise_distances(x)
    np.testing.assert_allclose(d, want, atol=1e-9)
    np.testing.assert_allclose(d, d.T, atol=1e-12)
    assert (np.diag(d) == 0).all()
    assert pairwise_distances(np.zeros((0, 3))).shape == (0, 0)


def test_omega_parts_is_the_ca_cb_cb_ca_dihedral():
    rng = np.random.default_rng(5)
    cb = rng.normal(size=(25, 3)) * 8
    u = rng.normal(size=(25, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ca = cb - 1.53 * u
    d = pairwise_distances(cb)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    y, x = omega_parts(cb - cb.mean(axis=0), u, inv)
    omega = np.arctan2(y, x)
    for i, j in [(0, 1), (3, 17), (24, 2), (11, 12)]:
        assert omega[i, j] == pytest.approx(plain_dihedral(ca[i], cb[i], cb[j], ca[j]), abs=1e-9)
    np.testing.assert_allclose(omega, omega.T, atol=1e-9)


def test_ca_directions_from_phi_are_exact(protein):
    f = sixd(protein.n, protein.ca, protein.c)
    cb = virtual_cb(protein.n, protein.ca, protein.c)
    mask = f.d < 80.0
    np.fill_diagonal(mask, False)
    w = ca_directions(cb, f.phi, mask)
    true = protein.ca - cb
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    np.testing.assert_allclose(w, true, atol=1e-8)
