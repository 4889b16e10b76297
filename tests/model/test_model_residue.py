"""The per-residue family: exactly one code per residue at every length, codes independent of
padding, decode(encode(x)) equals the forward pass, its images are real backbones' images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoken.codec import features_to_image
from protoken.geometry import sixd
from protoken.model import (
    ResidueConfig,
    ResidueVQVAE,
    build_model,
    config_from_dict,
    config_to_dict,
    mask_from_lengths,
)
from protoken.structure import read_backbones

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "biotite__1aki.pdb"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("residue-tiny").eval()


@pytest.fixture(scope="module")
def images(structures_dir):
    out = []
    for name in NAMES:
        bb = read_backbones(structures_dir / name)[0]
        out.append(torch.tensor(features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)).float())
    return out


def _batch(images, side=None):
    side = side or max(im.shape[-1] for im in images)
    x = torch.zeros(len(images), 3, side, side)
    for i, im in enumerate(images):
        n = im.shape[-1]
        x[i, :, :n, :n] = im
    return x, mask_from_lengths([im.shape[-1] for im in images], side)


def test_presets_and_config_round_trip():
    for name in ("residue-tiny", "residue-small", "residue-base"):
        cfg = build_model(name).config
        assert cfg.codebook_size == 4096 and cfg.bits_per_token == 12
        assert config_from_dict(config_to_dict(cfg)) == cfg
    assert ResidueConfig(fsq_levels=(8, 5, 5, 5)).codebook_size == 1000
    with pytest.raises(ValueError):
        ResidueConfig(loss="l1")


@pytest.mark.parametrize("length", [40, 41, 97, 256, 513, 1024])
def test_one_code_per_residue_at_every_length(model, length):
    torch.manual_seed(length)
    x = torch.rand(1, 3, length, length) * 2 - 1
    codes = model.encode(x, mask_from_lengths([length], length))
    assert codes.shape == (1, length) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 4096


def test_padding_does_not_change_a_proteins_codes(model, images):
    alone = [model.encode(*_batch([im]))[0] for im in images]
    together = model.encode(*_batch(images, side=200))
    for i, im in enumerate(images):
        n = im.shape[-1]
        torch.testing.assert_close(together[i, :n], alone[i])
        assert (together[i, n:] == -1).all()


def test_decode_of_encode_is_the_forward_pass(model, images):
    x, mask = _batch(images)
    out = model(x, mask)
    lengths = [im.shape[-1] for im in images]
    decoded = model.decode(model.encode(x, mask).clamp(min=0), lengths)
    torch.testing.assert_close(decoded, out.recon, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.indices, model.encode(x, mask))
    assert out.aux_loss == 0 and 0 < float(out.metrics["codebook_usage"]) <= 1
    assert int(out.weight) == model.loss_weight(mask) == sum(n * (n - 1) for n in lengths)


def test_decoded_images_are_the_images_of_the_decoded_backbone(model, images):
    """The decoder ends in coordinates: its image is the 6D image of a real backbone."""
    x, mask = _batch(images[:1])
    codes = model.encode(x, mask)
    n, ca, c = (a[0].double().numpy() for a in model.decode_backbone(codes, [codes.shape[1]]))
    image = model.decode(codes, [codes.shape[1]])[0].detach().numpy()
    # float32 decoder vs float64 formulas; an untrained decoder puts atoms close together
    np.testing.assert_allclose(image, features_to_image(sixd(n, ca, c), 80.0), atol=1e-2)
    np.testing.assert_allclose(np.tril(image[0]), np.tril(features_to_image(sixd(n, ca, c))[0]),
                               atol=1e-5)  # fmt: skip


def test_training_lowers_the_loss(images):
    """60 AdamW steps on one real protein (1CTF_A, 68 residues) lower the geometric loss."""
    torch.manual_seed(0)
    model = ResidueVQVAE(ResidueConfig.preset("residue-tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, mask = _batch(images[1:2])
    losses = []
    for _ in range(60):
        out = model(x, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert min(losses[-5:]) < 0.85 * losses[0]


def test_bf16_autocast_keeps_the_geometry_in_fp32(images):
    """Under bf16 autocast (as protoken train on CUDA) the frames, 6D features and loss stay
    fp32: finite loss and gradients after a few steps."""
    torch.manual_seed(0)
    model = ResidueVQVAE(ResidueConfig.preset("residue-tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, mask = _batch(images)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, mask)
        assert out.recon.dtype == torch.float32 and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
