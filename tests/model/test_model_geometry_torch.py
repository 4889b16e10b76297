"""The torch 6D formulas equal protoken.geometry's numpy ones, on real backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoken.codec import features_to_image
from protoken.geometry import sixd
from protoken.model import geometry_torch as gt
from protoken.structure import read_backbones

NAMES = ["foldseek__d1asha_.pdb", "biotite__1aki.pdb", "kortemme__1CTF_A.pdb"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dmax", [20.0, 80.0])
def test_sixd_and_image_match_numpy_on_real_backbones(structures_dir, name, dmax):
    bb = read_backbones(structures_dir / name)[0]
    n, ca, c = (torch.tensor(a, dtype=torch.float64)[None] for a in (bb.n, bb.ca, bb.c))
    got = gt.sixd(n, ca, c, dmax)
    want = sixd(bb.n, bb.ca, bb.c, dmax=dmax)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[0].numpy(), w, atol=1e-6)
    image = gt.features_to_image(*got, dmax)[0].numpy()
    np.testing.assert_allclose(image, features_to_image(want, dmax), atol=1e-6)


def test_virtual_cb_matches_numpy(structures_dir):
    from protoken.geometry import virtual_cb

    bb = read_backbones(structures_dir / "biotite__1aki.pdb")[0]
    got = gt.virtual_cb(*(torch.tensor(a, dtype=torch.float64) for a in (bb.n, bb.ca, bb.c)))
    np.testing.assert_allclose(got.numpy(), virtual_cb(bb.n, bb.ca, bb.c), atol=1e-9)


def test_frames_give_ideal_backbone_geometry():
    torch.manual_seed(0)
    rot = gt.rotation_from_6d(torch.randn(7, 3, dtype=torch.float64),
                              torch.randn(7, 3, dtype=torch.float64))  # fmt: skip
    # proper rotations: orthonormal, determinant +1
    eye = torch.eye(3, dtype=torch.float64).expand(7, 3, 3)
    np.testing.assert_allclose((rot.transpose(-1, -2) @ rot).numpy(), eye.numpy(), atol=1e-6)
    np.testing.assert_allclose(torch.linalg.det(rot).numpy(), np.ones(7), atol=1e-6)
    n, ca, c = gt.backbone_from_frames(rot, torch.randn(7, 3, dtype=torch.float64) * 10)
    # literature bond lengths N-CA 1.458 A, CA-C 1.526 A and angle N-CA-C 111.0 degrees
    np.testing.assert_allclose((n - ca).norm(dim=-1).numpy(), 1.4606, atol=2e-3)
    np.testing.assert_allclose((c - ca).norm(dim=-1).numpy(), 1.526, atol=1e-6)
    cos = ((n - ca) * (c - ca)).sum(-1) / ((n - ca).norm(dim=-1) * (c - ca).norm(dim=-1))
    np.testing.assert_allclose(np.degrees(np.arccos(cos.numpy())), 111.06, atol=0.1)
