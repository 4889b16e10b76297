"""The per-residue family: K codes per residue at every length, codes independent of padding,
decode(encode(x)) equals the forward pass, decoding from the first k stages, chains known as
chains, its images are real backbones' images, and the first design's weights still give the
same tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from protoken.codec import dequantize, features_to_image, quantize
from protoken.geometry import sixd
from protoken.model import (
    ResidueConfig,
    ResidueVQVAE,
    build_model,
    config_from_dict,
    config_to_dict,
    mask_from_lengths,
)
from protoken.model.residue import (
    N_BUCKETS,
    PAIR_BINS,
    V1_FIELDS,
    binned_targets,
    chain_layout,
    relpos_buckets,
)
from protoken.structure import read_backbones

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "biotite__1aki.pdb"]
DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("residue-tiny").eval()


@pytest.fixture(scope="module")
def images(structures_dir):
    """Images as the model sees them: 8-bit, so many distances tie (steps of 0.31 A)."""
    out = []
    for name in NAMES:
        bb = read_backbones(structures_dir / name)[0]
        image = features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)
        out.append(torch.tensor(dequantize(quantize(image, 8))).float())
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
        assert json.loads(json.dumps(config_to_dict(cfg))) == config_to_dict(cfg)
    assert ResidueConfig(fsq_levels=(8, 5, 5, 5)).codebook_size == 1000
    with pytest.raises(ValueError):
        ResidueConfig(encoder="grid")
    with pytest.raises(ValueError):
        config_from_dict({"family": "residue", "loss": "l1"})


def test_a_config_of_the_first_design_builds_the_first_design():
    """A config written before this design (flat loss fields, no ``encoder``) is read as it
    was meant: pooled rows, rotary positions, one FSQ stage, no pair representation."""
    old = {"family": "residue", "d_model": 32, "n_head": 2, "rope_dim": 8, "n_layer_encoder": 1,
           "n_layer_decoder": 1, "pair_dim": 8, "n_rbf": 8, "loss": "geometric", "dmax": 60.0,
           "frame_weight": 0.5}  # fmt: skip
    cfg = config_from_dict(old)
    assert {k: getattr(cfg, k) for k in V1_FIELDS} == V1_FIELDS
    assert cfg.loss.kind == "geometric" and cfg.dmax == 60.0 and cfg.loss.frame_weight == 0.5
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_weights_of_the_first_design_give_the_same_tokens(structures_dir):
    """tests/data/residue-v1-tiny.*: a residue-tiny model of the first design and its codes
    and decoded image of 1CTF_A, written by the code before this design."""
    from safetensors import safe_open

    path = DATA / "residue-v1-tiny.safetensors"
    with safe_open(str(path), "pt") as fh:
        cfg = config_from_dict(json.loads(fh.metadata()["model_config"]))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    model = ResidueVQVAE(cfg).eval()
    model.load_state_dict(state)
    expected = np.load(DATA / "residue-v1-tiny-expected.npz")
    bb = read_backbones(structures_dir / "kortemme__1CTF_A.pdb")[0]
    x = torch.tensor(features_to_image(sixd(bb.n, bb.ca, bb.c), 80.0)).float()[None]
    L = x.shape[-1]
    codes = model.encode(x, mask_from_lengths([L], L))
    assert codes.shape == (1, L, 1)
    np.testing.assert_array_equal(codes[..., 0].numpy(), expected["codes"])
    decoded = model.decode(codes, [L]).detach().numpy()
    np.testing.assert_allclose(decoded, expected["decoded"], atol=1e-5)


@pytest.mark.parametrize("length", [40, 41, 97, 256, 513, 1024])
def test_stages_of_codes_per_residue_at_every_length(model, length):
    torch.manual_seed(length)
    x = torch.rand(1, 3, length, length) * 2 - 1
    codes = model.encode(x, mask_from_lengths([length], length))
    assert codes.shape == (1, length, model.n_stages) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 4096


def test_padding_does_not_change_a_proteins_codes_or_decoding(model, images):
    alone = [model.encode(*_batch([im]))[0] for im in images]
    x, mask = _batch(images, side=200)
    together = model.encode(x, mask)
    lengths = [im.shape[-1] for im in images]
    atoms = model.decode_backbone(together.clamp(min=0), lengths)
    decoded = model.decode(together.clamp(min=0), lengths)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(together[i, :n], alone[i])
        assert (together[i, n:] == -1).all()
        for a, b in zip(atoms, model.decode_backbone(alone[i][None], [n]), strict=True):
            torch.testing.assert_close(a[i, :n], b[0], atol=1e-4, rtol=0)  # Angstrom
        assert (decoded[i, :, n:] == 0).all() and (decoded[i, :, :, n:] == 0).all()


def test_decode_of_encode_is_the_forward_pass(model, images):
    x, mask = _batch(images)
    out = model(x, mask)
    lengths = [im.shape[-1] for im in images]
    decoded = model.decode(model.encode(x, mask).clamp(min=0), lengths)
    torch.testing.assert_close(decoded, out.recon, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.codes, model.encode(x, mask))
    usage = out.metrics["codebook_usage"]
    assert (
        out.aux_loss == 0
        and usage.shape == (model.n_stages,)
        and ((usage > 0) & (usage <= 1)).all()
    )
    assert int(out.weight) == model.loss_weight(mask) == sum(n * (n - 1) for n in lengths)


def test_decoding_from_the_first_k_stages(model, images):
    """The first k stages of the codes are a complete token set: decoding them equals decoding
    all stages with the later ones absent (-1), each stage refines the code vector, and the
    full set reproduces the quantiser's output."""
    x, mask = _batch(images[:1])
    L = x.shape[-1]
    codes = model.encode(x, mask)
    K = codes.shape[-1]
    buckets = model._layout(mask.diagonal(dim1=1, dim2=2), None)
    q_full = model._encode(x, mask, buckets)[0]
    torch.testing.assert_close(model.quantizer.lookup(codes), q_full, atol=1e-6, rtol=0)
    for k in range(1, K + 1):
        absent = codes.clone()
        absent[..., k:] = -1
        torch.testing.assert_close(model.decode(codes[..., :k], [L]), model.decode(absent, [L]))
    # finer stages move the code vector by less and less (FSQ scales 1, 1/8, 1/64, ...)
    steps = [
        (model.quantizer.lookup(codes[..., : k + 1]) - model.quantizer.lookup(codes[..., :k]))
        .abs().max() for k in range(1, K)
    ]  # fmt: skip
    assert all(b < a for a, b in zip(steps, steps[1:], strict=False))
    with pytest.raises(ValueError):
        model.decode(torch.zeros(1, L, K + 1, dtype=torch.long), [L])


def test_relative_positions_know_chains():
    """Within a chain the bucket is the signed separation (exact below 16, then log-spaced to
    128, clipped beyond); residues of different chains share one "another chain" bucket, and
    positions restart at each chain."""
    chains = torch.tensor([[0] * 5 + [1] * 300])
    rmask = torch.ones(1, 305, dtype=torch.bool)
    pos, same = chain_layout(chains, rmask)
    assert pos[0, :5].tolist() == list(range(5)) and pos[0, 5:8].tolist() == [0, 1, 2]
    b = relpos_buckets(pos, same)[0]
    assert (b[:5, 5:] == N_BUCKETS - 1).all() and (b[5:, :5] == N_BUCKETS - 1).all()
    row = b[5, 5:].tolist()  # separations 0..299 within chain B
    centre = row[0]
    assert [r - centre for r in row[:16]] == list(range(16))
    assert all(y >= x for x, y in zip(row, row[1:], strict=False))  # monotone
    assert row[128] == row[299] == max(row) < N_BUCKETS - 1  # clipped beyond 128
    assert len(set(row[16:128])) == 8  # 8 log-spaced buckets from 16 to 128
    back = b[5 + 20, 5].item()  # separation -20
    assert back == 2 * centre - row[20]
    single_pos, single_same = chain_layout(None, rmask)
    assert single_same.all() and (single_pos[0] == torch.arange(305)).all()


def test_a_complex_decodes_with_its_chains(model, images):
    """Chains change the decoding (the relative positions across them), and a one-chain layout
    equals no layout."""
    x, mask = _batch(images[:1])
    L = x.shape[-1]
    codes = model.encode(x, mask)
    one = torch.zeros(1, L, dtype=torch.long)
    two = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2)])
    torch.testing.assert_close(model.decode(codes, [L], one), model.decode(codes, [L]))
    assert not torch.allclose(model.decode(codes, [L], two), model.decode(codes, [L]))
    assert model.encode(x, mask, two).shape == codes.shape


def test_an_encoder_without_chains_reads_a_complex_as_one_chain(images):
    """``encoder_chains=False``: the encoder's latents of a complex are those of the same image
    read as one chain, while the decoder still decodes with the chains; ``True`` (the default,
    and what configs written before the field read as) lets the layout change the latents."""
    x, mask = _batch(images[:1])
    L = x.shape[-1]
    two = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2)])
    torch.manual_seed(0)
    aware = build_model("residue-tiny").eval()
    blind = build_model(ResidueConfig.preset("residue-tiny", encoder_chains=False)).eval()
    blind.load_state_dict(aware.state_dict())
    assert ResidueConfig.from_dict({k: v for k, v in aware.config.to_dict().items()
                                    if k != "encoder_chains"}).encoder_chains  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(aware.latent(x, mask, two), aware.latent(x, mask))
        torch.testing.assert_close(blind.latent(x, mask, two), blind.latent(x, mask))
        torch.testing.assert_close(blind.latent(x, mask), aware.latent(x, mask))
        codes = blind.encode(x, mask, two)
        assert torch.equal(codes, blind.encode(x, mask))
        assert not torch.allclose(blind.decode(codes, [L], two), blind.decode(codes, [L]))
        torch.testing.assert_close(blind.decode(codes, [L], two), aware.decode(codes, [L], two))
        out = blind(x, mask, two)  # training: the same codes as inference
        assert torch.equal(out.codes[..., 0], codes[..., 0])


def test_binned_targets_are_trrosettas_bins():
    d = torch.tensor([1.0, 2.0, 2.49, 2.5, 19.99, 20.0, 79.0])
    ang = torch.tensor([-math.pi, -math.pi + 0.01, 0.0, math.pi - 0.01, 0.1, 0.2, 0.3])
    phi = torch.tensor([0.0, 0.2, math.pi / 2, math.pi, 0.1, 0.1, 0.1])
    b = binned_targets(d, ang, ang, phi)
    assert b["d"].tolist() == [1, 1, 1, 2, 36, 0, 0]
    assert b["omega"].tolist()[:4] == [1, 1, 13, 24] and b["omega"][5:].tolist() == [0, 0]
    assert b["phi"].tolist()[:4] == [1, 1, 7, 12]
    assert all(int(b[k].max()) < n for k, n in PAIR_BINS.items())


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
    """60 AdamW steps on one real protein (1CTF_A, 68 residues) lower the loss."""
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
