"""The geometric loss: zero on the truth, periodic in the angles, contacts weigh more than far
pairs, distances alone cannot tell the mirror image, the frame term does; the weight counts
pairs i != j."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protoken.codec import features_to_image
from protoken.geometry import sixd
from protoken.model import build_model, mask_from_lengths
from protoken.model.losses import LossConfig, geometric_loss, geometric_weight, mse_loss
from protoken.structure import chain_index, read_backbones


@pytest.fixture(scope="module")
def real(structures_dir):
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    return bb, torch.tensor(features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0))[None].float()


def _loss(a, b, **kw):
    mask = mask_from_lengths([a.shape[-1]], a.shape[-1])
    return geometric_loss(a, b, mask, LossConfig(kind="geometric", **kw))


def test_zero_on_the_truth_and_weight_counts_pairs(real):
    _, x = real
    total, weight = _loss(x, x)
    L = x.shape[-1]
    assert float(total) / float(weight) < 1e-3 and int(weight) == L * (L - 1)
    mask = mask_from_lengths([L, 20], L)
    assert geometric_weight(mask) == L * (L - 1) + 20 * 19
    assert int(mse_loss(x, x, mask_from_lengths([L], L))[1]) == 3 * L * L


def test_angles_are_periodic(real):
    _, x = real
    y = x.clone()
    L = x.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    # omega + 2 pi: the same angle (channel 0's upper triangle holds omega / pi)
    y[0, 0][upper] = x[0, 0][upper] + 2.0
    y[0, 1] = x[0, 1] - 2.0  # theta - 2 pi
    assert float(_loss(y, x, frame_weight=0)[0]) < 1e-2
    z = x.clone()
    z[0, 1] = x[0, 1] + 1.0  # theta + pi: a real error
    assert float(_loss(z, x, frame_weight=0)[0]) > 100


def test_a_contact_error_costs_more_than_the_same_error_far_away(real):
    _, x = real
    d = (x[0, 0] + 1) * 40  # Angstrom in the lower triangle
    L = x.shape[-1]
    lower = torch.ones(L, L, dtype=torch.bool).tril(-1)
    near = ((d < 8) & lower).nonzero()[0]
    far = ((d > 40) & (d < 70) & lower).nonzero()[0]
    costs = []
    for i, j in (near, far):
        y = x.clone()
        y[0, 0, i, j] += 2.0 / 80 * 2  # +2 A
        costs.append(float(_loss(y, x, angle_weight=0, frame_weight=0)[0]))
    assert costs[0] > 2 * costs[1] > 0


def test_distances_cannot_see_the_mirror_image_the_frame_term_does(real):
    from protoken.geometry import virtual_cb

    bb, x = real
    cb = virtual_cb(bb.n, bb.ca, bb.c)
    # the mirror image of every atom (Cb included; a virtual Cb of mirrored N, CA, C would not be)
    mirror = sixd(-bb.n, -bb.ca, -bb.c, cb=-cb)
    mirror = torch.tensor(features_to_image(mirror, 80.0))[None].float()
    # same distances and phi; omega and theta change sign
    np.testing.assert_allclose(mirror[0, 2].numpy(), x[0, 2].numpy(), atol=1e-5)
    np.testing.assert_allclose(mirror[0, 1].numpy(), -x[0, 1].numpy(), atol=1e-5)
    dist_only = float(_loss(mirror, x, angle_weight=0, frame_weight=0)[0])
    framed = float(_loss(mirror, x, angle_weight=0)[0])
    L = x.shape[-1]
    assert dist_only < 1e-3 * L and framed > 10 * L
    assert not math.isnan(framed)


def test_gradients_are_finite_at_the_truth(real):
    _, x = real
    y = x.clone().requires_grad_(True)
    total, _ = _loss(y, x)
    total.backward()
    assert torch.isfinite(y.grad).all()


def test_interface_weight_scales_exactly_the_near_pairs_of_different_chains(structures_dir):
    """Real heterodimer (2q2k, chains of 45 and 44): with weight w the loss gains (w - 1) times
    the loss summed over the inter-chain pairs closer than frame_cutoff, and nothing else."""
    bb = read_backbones(structures_dir / "openfold__2q2k.cif.gz", chains="complex",
                        models="first")[0]  # fmt: skip
    x = torch.tensor(features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0))[None].float()
    L = x.shape[-1]
    ch = torch.as_tensor(chain_index(bb.chains))
    other = (ch[:, None] != ch[None, :])[None]
    assert 0 < int(other.sum()) < L * L
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    mask = mask_from_lengths([L], L)
    d = (x[0, 0].tril(-1) + x[0, 0].tril(-1).T + 1) * 40
    interface = other & (d < 20.0)[None] & mask
    assert int(interface.sum()) > 0  # the chains touch
    plain = float(geometric_loss(y, x, mask, LossConfig(kind="geometric"))[0])
    just_interface = float(geometric_loss(y, x, interface, LossConfig(kind="geometric"))[0])
    cfg = LossConfig(kind="geometric", interface_weight=4.0)
    weighted, weight = geometric_loss(y, x, mask, cfg, other)
    assert float(weighted) == pytest.approx(plain + 3.0 * just_interface, rel=1e-4)
    assert int(weight) == L * (L - 1)  # the normaliser does not change
    # single chains (no layout) and weight 1 are the plain loss
    assert float(geometric_loss(y, x, mask, cfg)[0]) == pytest.approx(plain, rel=1e-6)
    same = LossConfig(kind="geometric")
    assert float(geometric_loss(y, x, mask, same, other)[0]) == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("preset, extra", [("residue-tiny", {}), ("tiny", {"chain_aware": True})])
def test_both_families_weigh_the_interfaces_of_a_complex(structures_dir, preset, extra):
    """The same weights with interface_weight 1 and 5 on a real heterodimer: a model's loss
    gains 4 times the loss of its own reconstruction over the inter-chain pairs under 20 A;
    without a chain layout the weight changes nothing."""
    bb = read_backbones(structures_dir / "openfold__2q2k.cif.gz", chains="complex",
                        models="first")[0]  # fmt: skip
    n = bb.ca.shape[0]
    side = 96  # a multiple of the hierarchical model's downsampling
    x = torch.zeros(1, 3, side, side)
    x[0, :, :n, :n] = torch.tensor(features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)).float()
    mask = mask_from_lengths([n], side)
    chains = torch.full((1, side), -1, dtype=torch.long)
    chains[0, :n] = torch.as_tensor(chain_index(bb.chains))
    models = []
    for w in (1.0, 5.0):
        torch.manual_seed(0)
        loss = {"kind": "geometric", "interface_weight": w}
        models.append(build_model(preset, {**extra, "loss": loss}).eval())
    with torch.no_grad():
        plain, weighted = (m(x, mask, chains) for m in models)
        torch.testing.assert_close(plain.recon, weighted.recon)
        d = (x[0, 0].tril(-1) + x[0, 0].tril(-1).T + 1) * 40
        other = (chains[0, :, None] != chains[0, None, :]) & (d < 20.0)
        interface = mask & other[None]
        cfg = LossConfig(kind="geometric")
        extra_loss = float(geometric_loss(plain.recon, x, interface, cfg)[0])
        assert extra_loss > 0
        assert float(weighted.loss_sum) == pytest.approx(
            float(plain.loss_sum) + 4.0 * extra_loss, rel=1e-4
        )
        alone = [float(m(x, mask).loss_sum) for m in models]
        assert alone[0] == pytest.approx(alone[1], rel=1e-6)
