"""Decoding by inversion: the quantiser's soft cells agree with vector-quantize-pytorch's
rounding, the mismatch is 0 exactly where a latent quantises to its codes, and refining the
bundled ``residue`` decoder's backbones of real held-out proteins gives back more of their
tokens and brings them closer to the true structures, with peptide bonds kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import FSQ

from protoken.metrics import tm_score
from protoken.model import build_model
from protoken.model.inversion import PEPTIDE_BOND, _peptide_links, refine
from protoken.model.residue import _soft_bound
from protoken.structure import read_backbones
from protoken.tokenizer import Tokenizer

#: Small proteins of configs/heldout.tsv (held out from the bundled residue's training).
HELD_OUT = ["kortemme__1GUU_A.pdb", "biopython__1LCD.pdb.gz", "proteinmpnn__6MRR.pdb.gz"]


@pytest.mark.parametrize("kind", ["symmetric-clamp", "symmetric-tanh", "plain"])
def test_soft_bound_rounds_to_the_librarys_codes(kind):
    """The cell of ``_soft_bound`` (value +- half width; the outermost cells open) holds the
    library's code of every z: the formulas copied from vector-quantize-pytorch still hold."""
    levels = [8, 5, 5, 5] if kind == "plain" else [8, 8, 8, 8]
    layer = FSQ(levels=levels, preserve_symmetry=kind != "plain")
    if kind == "symmetric-clamp":
        layer.bound_hard_clamp = True
    torch.manual_seed(0)
    z = torch.randn(4000, len(levels)) * 2
    code = layer.quantize(z[:, None, :])[:, 0]
    u, half, top = _soft_bound(layer, z)
    err = u - code
    inside = (err.abs() <= half + 1e-5) | ((code >= top - 1e-6) & (err > 0))
    inside |= (code <= -1 + 1e-6) & (err < 0)
    assert inside.all()
    # and the cells are no wider than the library's: values inside [-1, top] reach their
    # cell's edge, never beyond
    within = (u >= -1) & (u <= top)
    assert (err.abs() * within).amax(0).min() > 0.95 * half.min()


def test_mismatch_is_zero_where_the_latent_quantises_to_the_codes():
    torch.manual_seed(0)
    model = build_model("residue-tiny").eval()
    q = model.quantizer
    z = torch.randn(2, 50, len(model.config.fsq_levels)) * 1.5
    with torch.no_grad():
        _, codes = q(z)
    K = codes.shape[-1]
    scales = list(q.rfsq.scales)
    for k in range(1, K + 1):
        got = q.mismatch(z, codes[..., :k])
        half = 1.0 / (q.rfsq.layers[k - 1]._levels.float() - 1)
        # the stages before the last are inside their cells; the last within its half cell
        bound = float(((half * scales[k - 1][0]) ** 2).sum())
        assert got.shape == (2, 50) and float(got.max()) <= bound + 1e-6
    # other codes: the latent is outside their cells
    wrong = (codes + 1) % q.size
    assert float(q.mismatch(z, wrong[..., :1]).min()) > 0
    assert float(q.mismatch(z, codes[..., :2]).mean()) < float(q.mismatch(z, wrong[..., :2]).mean())


def test_peptide_links_stop_at_chain_breaks():
    chains = torch.tensor([0, 0, 0, 1, 1, 2])
    assert _peptide_links(chains, 6, "cpu").tolist() == [True, True, False, True, False]
    assert _peptide_links(None, 4, "cpu").tolist() == [True, True, True]


@pytest.fixture(scope="module")
def bundled():
    tok = Tokenizer.load("residue", device="cpu")
    tok.refine = 0
    return tok


@pytest.mark.parametrize("stages", [1, 4])
def test_refining_real_proteins_gives_back_their_tokens_and_their_fold(bundled, structures_dir,
                                                                        stages):  # fmt: skip
    model = bundled.model
    before, after = [], []
    for name in HELD_OUT:
        bb = read_backbones(structures_dir / name, chains="first", models="first")[0]
        bundled.stages = stages
        t = bundled.encode(structures_dir / name, chains="first", models="first")
        codes = model.batch_codes([t.levels], [t.length])
        plain = model.decode_backbone(codes, [t.length])
        if stages == 1:  # 0 steps: the decoder's backbone, exactly
            same = refine(model, codes, [t.length], steps=0)
            for a, b in zip(same[:3], plain, strict=True):
                torch.testing.assert_close(a, b)
        r = refine(model, codes, [t.length], steps=100)
        assert float(r.recovered_after[0]) > float(r.recovered_before[0])
        bond = (r.c[0, :-1] - r.n[0, 1:]).norm(dim=-1)
        assert float((bond - PEPTIDE_BOND).abs().max()) < 0.25
        truth = _cb(bb)
        before.append(tm_score(_cb_of(plain), truth))
        after.append(tm_score(_cb_of((r.n, r.ca, r.c)), truth))
    bundled.stages = None
    # closer to the truth, which the refinement never saw, from all 4 stages (the stage-6
    # weights on the 143 held-out proteins: +0.018 / +0.039 in median at 1 / 4 stages); from 1
    # stage these three small proteins gain nothing on average with the stage-6 weights (-0.001;
    # stage 5: +0.007), so there the test asks only that no fold is lost
    gain = np.array(after) - np.array(before)
    if stages == 4:
        assert gain.mean() > 0.005 and gain.min() > -0.01, (before, after)
    assert gain.min() > -0.03 and gain.mean() > -0.01, (before, after)


def _cb(bb):
    from protoken.geometry import virtual_cb

    return virtual_cb(bb.n, bb.ca, bb.c)


def _cb_of(atoms) -> np.ndarray:
    from protoken.geometry import virtual_cb

    n, ca, c = (a[0].double().numpy() for a in atoms)
    return virtual_cb(n, ca, c)


def test_tokenizer_refine_setting(bundled):
    assert Tokenizer.load("residue", device="cpu").refine == 100
    with pytest.raises(ValueError, match=">= 0"):
        bundled.refine = -1
    hier = Tokenizer.load("default", device="cpu")
    assert hier.refine == 0
    with pytest.raises(ValueError, match="per-residue"):
        hier.refine = 10
    hier.refine = 0
