"""Image -> 3D: MDS, handedness, refinement with clipped pairs, structure output.

Expectations are independent of the code under test: the Cb computed from the original files
(protoken.geometry, itself tested against the reference design's formulas), known geometry, and
mirror images built here. The full-set figures (all single-chain proteins, 8 and 16 bit) are printed
by ``benchmarks/reconstruct.py --roundtrip``; here a representative subset is checked.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import gemmi
import numpy as np
import pytest

from conftest import REPO
from protoken.codec import dequantize, features_to_image, image_to_features, quantize
from protoken.evaluate import compare_with_reference
from protoken.geometry import pairwise_distances, sixd, virtual_cb
from protoken.metrics import mirror_rmsd, rmsd
from protoken.reconstruct import (
    HANDEDNESS_MIN,
    clipped_mask,
    distance_rms,
    fill_clipped,
    handedness_confidence,
    handedness_score,
    load_image,
    mds,
    part_scores,
    reconstruct,
    refine_distances,
    residue_handedness,
    resolve_handedness,
    resolve_part_handedness,
    rigid_parts,
    stress,
)
from protoken.structure import read_backbones, structure_to_text

# a spread of sizes and folds; 1avyA00 (68, coiled coil), 3po3S (164) and 6WQA (391) have
# clipped pairs
SUBSET = [
    "cathtools__1c56A",  # 40
    "biopython__1A8O",  # 70
    "cathtools__1avyA00",  # 68, clipped
    "foldseek__d1asha_",  # 147
    "cathtools__3po3S",  # 164, clipped
    "biotite__1dix",  # 208
    "biopython__6WQA",  # 391, clipped
]


def image_of(bb, bit_depth: int | None = 16, dmax: float = 80.0) -> np.ndarray:
    """The image of a backbone, optionally through PNG quantisation."""
    image = features_to_image(sixd(bb.n, bb.ca, bb.c, dmax), dmax)
    return image if bit_depth is None else dequantize(quantize(image, bit_depth), np.float64)


def cb_of(bb) -> np.ndarray:
    return virtual_cb(bb.n, bb.ca, bb.c)


def manifest_rows(folder: Path) -> dict[str, dict]:
    with open(folder / "manifest.tsv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh, delimiter="\t") if r["status"] == "ok"}


@pytest.fixture(scope="module")
def protein(structures_dir):
    """d1asha_, a 147-residue SCOPe domain."""
    return read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]


# --------------------------------------------------------------------------- MDS


def test_mds_recovers_euclidean_points_up_to_a_rigid_motion():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [20.0, 10.0, 5.0]
    y = mds(pairwise_distances(x))
    assert y.shape == (200, 3)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-9)
    assert min(rmsd(y, x), mirror_rmsd(y, x)) < 1e-9
    # axes along decreasing variance
    var = y.var(axis=0)
    assert var[0] >= var[1] >= var[2]


@pytest.mark.parametrize(
    "distances",
    [
        np.zeros((5, 5)),
        np.zeros((1, 1)),
        np.array([[0.0, 3.0], [3.0, 0.0]]),
        np.full((10, 10), np.nan),
        np.abs(np.random.default_rng(1).normal(size=(30, 30))) * 50,  # not Euclidean
    ],
)
def test_mds_degenerate_and_non_euclidean_inputs_stay_finite(distances):
    y = mds(distances)
    assert y.shape == (len(distances), 3)
    assert np.isfinite(y).all()
    if len(distances) == 2:
        assert np.linalg.norm(y[0] - y[1]) == pytest.approx(3.0)


# --------------------------------------------------------------------------- handedness


def test_resolve_handedness_returns_the_image_hand_from_either_input(protein):
    f = sixd(protein.n, protein.ca, protein.c)
    cb = cb_of(protein)
    mask = f.d < 80.0
    np.fill_diagonal(mask, False)
    mirror = cb * np.array([1.0, -1.0, 1.0])
    out1, flipped1, s1 = resolve_handedness(cb, f, mask)
    out2, flipped2, s2 = resolve_handedness(mirror, f, mask)
    assert (flipped1, flipped2) == (False, True)
    assert s1 == pytest.approx(1.0) and s2 == pytest.approx(1.0)
    assert rmsd(out1, cb) < 1e-9 and rmsd(out2, cb) < 1e-9


def test_exact_mirror_image_returns_each_hand(protein):
    """The exact mirror image of a real protein (every atom, Cb included, reflected) has the
    same distances and opposite omega and theta. MDS sees identical inputs and so returns the
    same coordinates for both: one of them is necessarily the wrong hand. The pipeline must
    return the original handedness for each image."""
    f = sixd(protein.n, protein.ca, protein.c)
    mirror_f = f._replace(omega=-f.omega, theta=-f.theta)
    cb = cb_of(protein)
    refs = {"original": cb, "mirror": cb * np.array([-1.0, 1.0, 1.0])}
    images = {
        "original": dequantize(quantize(features_to_image(f), 16), np.float64),
        "mirror": dequantize(quantize(features_to_image(mirror_f), 16), np.float64),
    }
    np.testing.assert_array_equal(mds(image_to_features(images["original"]).d),
                                  mds(image_to_features(images["mirror"]).d))  # fmt: skip
    recs = {name: reconstruct(image) for name, image in images.items()}
    assert recs["original"].mirrored_before_fix != recs["mirror"].mirrored_before_fix
    for name, rec in recs.items():
        other = "mirror" if name == "original" else "original"
        assert rmsd(rec.cb, refs[name]) < 1e-3
        assert rmsd(rec.cb, refs[other]) > 5.0
        assert mirror_rmsd(rec.cb, refs[other]) < 1e-3
        assert rec.handedness_score > 0.999


def test_mirrored_backbone_keeps_its_own_handedness(protein):
    """A mirrored backbone (N, CA, C reflected; its virtual Cb then follows the seed's formula,
    so the Cb set is not simply reflected) also comes back with its own handedness."""
    mirror_bb = protein.coords * np.array([-1.0, 1.0, 1.0])
    for coords in (protein.coords, mirror_bb):
        n, ca, c = coords[:, 0], coords[:, 1], coords[:, 2]
        image = dequantize(quantize(features_to_image(sixd(n, ca, c)), 16), np.float64)
        m = compare_with_reference(reconstruct(image), coords)
        assert m["cb_rmsd"] < 1e-3 and not m["mirror_image"]


# --------------------------------------------------------------------------- refinement


def test_stress_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3)) * 10
    d = pairwise_distances(rng.normal(size=(12, 3)) * 10)
    clipped = np.zeros((12, 12), dtype=bool)
    clipped[0, 5] = clipped[5, 0] = clipped[2, 9] = clipped[9, 2] = True
    dmax = 15.0
    f, grad = stress(x, d, clipped, dmax)
    # f is half the mean squared violation over ordered pairs
    assert f == pytest.approx(distance_rms(x, d, clipped, dmax) ** 2 / 2)
    eps = 1e-6
    flat = x.ravel()
    num = [
        (stress(flat + eps * e, d, clipped, dmax)[0] - stress(flat - eps * e, d, clipped, dmax)[0])
        / (2 * eps)
        for e in np.eye(36)
    ]
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-9)


def test_refinement_recovers_a_protein_with_clipped_pairs(structures_dir):
    """1avyA00, a 68-residue coiled coil 92 A long: MDS reads its 30 clipped pairs as 80 A and
    bends it; refinement with the hinge brings it back to the 16-bit precision."""
    bb = read_backbones(structures_dir / "cathtools__1avyA00.pdb")[0]
    cb = cb_of(bb)
    image = image_of(bb)
    clipped = clipped_mask(image)
    assert clipped.sum() // 2 == int((pairwise_distances(cb) >= 80.0).sum() // 2) == 30
    d = image_to_features(image).d
    x0 = mds(d)
    assert min(rmsd(x0, cb), mirror_rmsd(x0, cb)) > 1.0
    x = refine_distances(x0, d, clipped)
    assert min(rmsd(x, cb), mirror_rmsd(x, cb)) < 1e-3
    r = pairwise_distances(x)
    assert r[clipped].min() > 80.0 - 1e-3  # clipped pairs kept apart
    assert distance_rms(x, d, clipped) < 1e-3 < distance_rms(x0, d, clipped)
    rec = reconstruct(image)
    assert rec.refined and rec.clipped_pairs == 30
    assert rec.distance_rms < 1e-3 < rec.distance_rms_mds
    assert compare_with_reference(rec, bb)["cb_rmsd"] < 1e-3
    # without refinement: classical MDS of the distances with the clipped ones filled by
    # shortest paths, already close (MDS of the clipped distances as they are: > 1 A)
    no = reconstruct(image, refine=False)
    assert not no.refined and 1e-3 < compare_with_reference(no, bb)["cb_rmsd"] < 0.1


# --------------------------------------------------------------------------- clipped pairs

# Extended proteins of the ProMod3 database (../shared/data/promod3), each beyond the old
# pipeline's reach at 8 bit and dmax 80 (classical MDS of the clipped distances as they are, then
# the refinement: TM 0.68-0.88, 3C9I_C mirrored). benchmarks/reconstruct.py --clipped runs the
# 216 chains of the test set.
EXTENDED = {
    "rod": "4CPC_C_13463",  # 152 residues, one straight helix 222 A long; 42% of pairs clipped
    "two domains on a linker": "5I6R_A_18872",  # helical domain (1-116), 24-residue linker,
    # helix (141-182); 38% clipped
    "tail": "3C9I_C_8214",  # 28-residue N-terminal tail, 110-residue helix, beta domain; 49%
}


@pytest.fixture(scope="module")
def extended(shared) -> dict:
    """The :data:`EXTENDED` chains, read from the ProMod3 Foldcomp database."""
    pytest.importorskip("foldcomp")
    from protoken.archives import iter_foldcomp, read_member

    wanted = {v: k for k, v in EXTENDED.items()}
    out = {}
    for m in iter_foldcomp(str(shared / "data" / "promod3" / "promod3")):
        if m.id in wanted:
            out[wanted[m.id]] = read_member(m.name, m.kind, m.read())[0]
    assert len(out) == len(EXTENDED)
    return out


# The old pipeline (MDS of the clipped distances as they are, refinement, omega's hand): its
# one copy is in benchmarks/reconstruct.py, which reports its figures.
_spec = importlib.util.spec_from_file_location(
    "reconstruct_benchmark", REPO / "benchmarks" / "reconstruct.py"
)
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
before_issue_26 = _bench.before_issue_26


@pytest.mark.parametrize("kind", list(EXTENDED))
def test_extended_proteins_come_back_from_clipped_pairs(extended, kind):
    """8-bit images at dmax 80 of a rod, two domains on a linker and a tail: the clipped pairs
    filled by shortest paths before MDS give the structure back to the image's precision, in
    the right hand; the old pipeline bent or mirrored each of them."""
    from protoken.metrics import tm_score

    bb = extended[kind]
    cb = cb_of(bb)
    image = image_of(bb, 8)
    clipped = clipped_mask(image)
    assert clipped.sum() / (len(cb) * (len(cb) - 1)) > 0.35
    rec = reconstruct(image)
    m = compare_with_reference(rec, bb)
    assert m["tm_score"] > 0.999 and m["cb_rmsd"] < 0.5 and not m["mirror_image"], m
    assert rec.handedness == "determined" and rec.handedness_confidence > 0.5
    assert rec.rigid_parts >= 3 and rec.refined
    assert r_clipped_min(rec.cb, clipped) > 80.0 - 0.05  # the lower bounds hold
    old = before_issue_26(image)
    assert tm_score(old, cb) < 0.9 or mirror_rmsd(old, cb) < rmsd(old, cb)


def r_clipped_min(x: np.ndarray, clipped: np.ndarray) -> float:
    return float(pairwise_distances(x)[clipped].min())


def test_shortest_paths_estimate_clipped_distances(extended):
    """The fill is an upper bound of each clipped distance (up to 8-bit rounding), close to it
    on extended chains, and never below dmax; known distances are untouched."""
    bb = extended["rod"]
    true = pairwise_distances(cb_of(bb))
    image = image_of(bb, 8)
    d = image_to_features(image).d
    clipped = clipped_mask(image)
    filled = fill_clipped(d, clipped)
    ratio = filled[clipped] / true[clipped]
    assert np.median(ratio) < 1.01 and ratio.min() > 0.995 and ratio.max() < 1.05
    assert filled[clipped].min() >= 80.0 and np.array_equal(filled[~clipped], d[~clipped])
    np.testing.assert_array_equal(filled, filled.T)
    # two pieces with no known pair between them (a chain break wider than dmax): no path, so
    # the largest filled value, still >= dmax
    far = np.zeros((4, 4), dtype=bool)
    far[:2, 2:] = far[2:, :2] = True
    d4 = np.where(far, 80.0, 5.0)
    np.fill_diagonal(d4, 0.0)
    assert (fill_clipped(d4, far)[far] == 80.0).all()


def test_rigid_parts_hold_only_known_pairs(extended, protein):
    bb = extended["two domains on a linker"]
    image = image_of(bb, 8)
    d = image_to_features(image).d
    clipped = clipped_mask(image)
    parts = rigid_parts(d, clipped)
    assert parts.max() >= 2 and parts[0] == 0
    same = parts[:, None] == parts[None, :]
    assert not (clipped & same).any()  # inside a part every distance is known
    img = image_of(protein)
    assert (rigid_parts(image_to_features(img).d, clipped_mask(img)) == 0).all()


def test_a_mirrored_domain_is_mirrored_back(extended):
    """3C9I_C's beta domain and last helix (residues 140-233, beyond the long helix) as their
    mirror image, attached in place and refined: a local minimum of the refinement (10 A from
    the truth). Their own angles say so, and whichever hand the whole takes, the stretch that
    disagrees with it is mirrored back."""
    from protoken.reconstruct import _flip_part

    bb = extended["tail"]
    cb = cb_of(bb)
    image = image_of(bb, 16)
    f = image_to_features(image)
    clipped = clipped_mask(image)
    known = ~clipped
    np.fill_diagonal(known, False)
    domain = np.zeros(len(cb), dtype=bool)
    domain[139:] = True
    bad = refine_distances(_flip_part(cb, domain, known), f.d, clipped)
    assert min(rmsd(bad, cb), mirror_rmsd(bad, cb)) > 5.0
    e = residue_handedness(bad, f, known, f.d)
    # the refinement pulled the helix's last 40 residues over to the mirrored side
    assert (e[:95] > 0).all() and (e[100:] < 0).all()
    scores, judged = part_scores(bad, f, known, rigid_parts(f.d, clipped))
    assert judged.all() and (scores < 0).any() and (scores > 0).any()
    # the whole takes the hand of the majority of the evidence (here the beta domain's), then
    # the stretch that disagrees is mirrored back
    whole, _, _ = resolve_handedness(bad, f, known)
    fixed, flipped = resolve_part_handedness(whole, f, known, f.d, clipped)
    assert flipped == 1 and rmsd(fixed, cb) < 0.01
    same, none = resolve_part_handedness(cb, f, known, f.d, clipped)
    assert none == 0 and rmsd(same, cb) < 1e-6  # a right structure is left alone


def test_theta_decides_the_hand_when_omega_is_lost(protein):
    """Decoded images may keep little of omega's sign; theta's is then the evidence. Without
    any signed angle the hand is undetermined."""
    image = image_of(protein, 8)
    cb = cb_of(protein)
    mirror = cb * np.array([-1.0, 1.0, 1.0])
    no_omega = image.copy()
    no_omega[0][np.triu_indices(len(cb), 1)] = 0.0  # omega = 0 everywhere
    f = image_to_features(no_omega)
    known = ~clipped_mask(no_omega)
    np.fill_diagonal(known, False)
    assert handedness_score(cb, f, known) == 0.0  # omega says nothing
    assert (
        handedness_confidence(cb, f, known) > 0.3 > -0.3 > handedness_confidence(mirror, f, known)
    )
    assert resolve_handedness(mirror, f, known)[1] and not resolve_handedness(cb, f, known)[1]
    rec = reconstruct(no_omega)
    assert rec.handedness == "determined" and rmsd(rec.cb, cb) < 0.1
    neither = no_omega.copy()
    neither[1] = 0.0  # theta = 0 too
    rec = reconstruct(neither)
    assert rec.handedness_confidence == 0.0 < HANDEDNESS_MIN and rec.handedness == "undetermined"
    exact = reconstruct(image)
    assert exact.handedness == "determined" and exact.handedness_confidence > 0.8


def test_compact_proteins_take_the_plain_path(protein):
    """No clipped pair: MDS, the refinement only if MDS misses, the hand; nothing else (the
    pipeline of before issue 26, bit for bit)."""
    for bits in (8, 16):
        image = image_of(protein, bits)
        f = image_to_features(image)
        known = ~clipped_mask(image)
        np.fill_diagonal(known, False)
        rec = reconstruct(image)
        x = mds(f.d)
        if distance_rms(x, f.d) > 1e-3:
            x = refine_distances(x, f.d, np.zeros_like(known))
        expected = resolve_handedness(x, f, known)[0]
        assert rec.clipped_pairs == 0 and rec.rigid_parts == 1 and rec.mirrored_parts == 0
        np.testing.assert_array_equal(rec.cb, expected)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bit_depth, limit", [(16, 1e-3), (8, 0.05)])
def test_round_trip_through_png_on_real_proteins(request, bit_depth, limit):
    """convert -> PNG -> reconstruct, against the Cb of the original file (issue acceptance:
    median <= 0.001 A from 16 bit, <= 0.05 A from 8 bit, no mirror image)."""
    folder = request.getfixturevalue(f"converted{bit_depth}")
    rows = manifest_rows(folder)
    results = []
    for sid in SUBSET:
        row = rows[sid]
        rec = reconstruct(folder / row["bin"] / f"{sid}.png")
        m = compare_with_reference(rec, read_backbones(row["source"])[0])
        assert not m["mirror_image"], sid
        assert m["tm_score"] > 0.999 and m["lddt"] > 0.999, sid
        assert m["cb_rmsd"] < 3 * limit, sid
        results.append(m)
    assert np.median([m["cb_rmsd"] for m in results]) <= limit
    clipped = [m for m in results if m["clipped_pairs"]]
    assert len(clipped) == 3


def test_noisy_images_degrade_gracefully(protein):
    """Model outputs are not exact images: noise, out-of-range values, NaN pixels."""
    rng = np.random.default_rng(3)
    image = image_of(protein, None)
    cb = cb_of(protein)
    noisy = image + rng.normal(size=image.shape) * 0.02  # ~0.8 A distance noise, ~4 deg angles
    rec = reconstruct(noisy)
    m = compare_with_reference(rec, protein)
    assert m["cb_rmsd"] < 1.0 and not m["mirror_image"] and m["tm_score"] > 0.9
    assert rec.handedness_score > 0.5
    wild = noisy * 3.0  # far outside [-1, 1]
    wild[0, 3, 7] = np.nan
    wild[1, 10, :] = np.inf
    for img in (wild, rng.uniform(-1, 1, size=(3, 50, 50)), np.zeros((3, 20, 20))):
        for backbone in (False,):
            out = reconstruct(img, backbone=backbone)
            assert np.isfinite(out.cb).all() and np.isfinite(out.handedness_score)
    assert np.isfinite(reconstruct(np.ones((3, 1, 1))).cb).all()
    with pytest.raises(ValueError):
        load_image(np.zeros((2, 5, 5)))
    assert rmsd(reconstruct(image).cb, cb) < 1e-6  # the input array was not modified


def test_torch_and_batched_inputs(protein):
    torch = pytest.importorskip("torch")
    image = image_of(protein)
    rec = reconstruct(torch.tensor(image[None], dtype=torch.float32))
    assert rmsd(rec.cb, cb_of(protein)) < 0.01


# --------------------------------------------------------------------------- output


def test_structure_text_has_one_cb_per_residue_numbered_in_image_order(protein):
    rec = reconstruct(image_of(protein))
    seq = protein.sequence
    for fmt in ("pdb", "cif"):
        text = rec.to_text(sequence=seq, fmt=fmt)
        st = (
            gemmi.read_pdb_string(text)
            if fmt == "pdb"
            else gemmi.make_structure_from_block(gemmi.cif.read_string(text).sole_block())
        )
        chain = st[0][0]
        assert len(chain) == len(protein)
        assert [r.seqid.num for r in chain] == list(range(1, len(protein) + 1))
        assert all(len(r) == 1 and r[0].name == "CB" for r in chain)
        assert gemmi.one_letter_code([r.name for r in chain]) == seq
        xyz = np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in chain])
        np.testing.assert_allclose(xyz, rec.cb, atol=1e-3)
    unk = structure_to_text(rec.cb)
    assert {r.name for r in gemmi.read_pdb_string(unk)[0][0]} == {"UNK"}


# --------------------------------------------------------------------------- workers, streamed


def test_reconstruct_tasks_do_not_grow_with_the_number_of_references(structures_dir, tmp_path):
    """Each worker task used to carry the whole reference index (5.3 MB a task at 100k
    references); now it carries its own reference's location."""
    import pickle

    from protoken.evaluate import ReferenceIndex, SequenceLookup, image_tasks, read_reference

    source = structures_dir / "foldseek__d1asha_.pdb"
    sizes = {}
    for n in (3, 300):
        refs = tmp_path / f"refs{n:04d}"
        refs.mkdir()
        for i in range(n):
            (refs / f"r{i:04d}.pdb").symlink_to(source)
        index = ReferenceIndex(str(refs))
        assert len(index.files) == n
        images = (f"/img/r{i:04d}.png" for i in (1, 2, 9999))  # the last has no reference
        tasks = list(image_tasks(images, str(tmp_path), SequenceLookup(None, 3), index))
        sizes[n] = [len(pickle.dumps(t)) for t in tasks]
        assert tasks[0].reference == (str(refs / "r0001.pdb"), "first")
        assert tasks[2].reference is None and tasks[2].with_references
        bb = read_reference("r0001", tasks[0].reference)
        assert len(bb) == 147
    assert sizes[300] == sizes[3] and max(sizes[300]) < 1000, sizes


def test_worker_tasks_are_drawn_as_the_workers_take_them():
    """At most twice the workers tasks in flight: a generator of inputs is never listed."""
    from protoken.evaluate import _imap

    consumed = []

    def tasks():
        for i in range(-50, 50):
            consumed.append(i)
            yield i

    results = _imap(abs, tasks(), workers=2)
    first = next(results)
    assert first == 50 and len(consumed) <= 4
    assert [first, *results] == [abs(i) for i in range(-50, 50)]  # in order, all of them
    consumed.clear()
    inline = _imap(abs, tasks(), workers=1)
    assert next(inline) == 50 and len(consumed) <= 2
