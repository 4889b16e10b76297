"""HierarchicalVQVAE: shapes, masks, losses, gradients, encode/decode, padding, symmetry."""

import dataclasses
import math

import pytest
import torch

from protoken.model import HierarchicalConfig, HierarchicalVQVAE, mask_from_lengths
from protoken.model.hierarchical import symmetrise

# tiny, with two blocks per stage (aligned + shifted windows) and 4x4 windows so that small
# test images already span several windows at the fine levels
CFG = HierarchicalConfig.preset(
    "tiny", n_layer_encoder=2, n_layer_decoder=2, window_sizes=(4, 4, 0), codebook_size=64
)


def _batch(lengths, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = mask_from_lengths(lengths, size)
    x = (torch.rand(len(lengths), 3, size, size, generator=g) * 2 - 1) * mask[:, None]
    return x, mask


def _model(cfg=CFG, seed=0) -> HierarchicalVQVAE:
    """A model whose codebooks were initialised by one training forward."""
    torch.manual_seed(seed)
    model = HierarchicalVQVAE(cfg)
    model(*_batch([40, 33, 48], 48, seed=123))
    return model.eval()


def test_mask_from_lengths():
    m = mask_from_lengths([2, 0, 3], 3)
    assert m.shape == (3, 3, 3) and m.dtype == torch.bool
    assert m[0].tolist() == [[True, True, False], [True, True, False], [False] * 3]
    assert not m[1].any() and m[2].all()
    with pytest.raises(ValueError):
        mask_from_lengths([4], 3)


def test_shapes_and_masks_for_lengths_not_multiple_of_the_downsampling():
    model = _model()
    lengths = [37, 20]  # caller pads to 48, a multiple of downsample_factor 16
    x, mask = _batch(lengths, 48)
    out = model(x, mask)
    assert out.recon.shape == x.shape
    assert out.recon[~mask[:, None].expand_as(x)].abs().max() == 0
    assert all(
        out.metrics[k].shape == (3,) for k in ("codebook_usage", "perplexity", "commit_loss")
    )
    shapes = [tuple(i.shape) for i in out.codes]
    assert shapes == [(2, 3, 3), (2, 6, 6), (2, 12, 12)]  # coarsest first: 48/16, 48/8, 48/4
    for idx, s in zip(out.codes, (16, 8, 4), strict=True):
        assert idx.dtype == torch.int64
        for b, n in enumerate(lengths):
            valid = math.ceil(n / s)
            assert (idx[b, :valid, :valid] >= 0).all()
            assert (idx[b, :valid, :valid] < CFG.codebook_size).all()
            assert (idx[b, valid:] == -1).all() and (idx[b, :, valid:] == -1).all()
    out4 = model(x, mask[:, None])  # (B, 1, H, W) masks are accepted too
    assert torch.equal(out4.recon, out.recon)


def test_sizes_must_be_multiples_of_the_downsample_factor():
    model = _model()
    x, mask = _batch([30], 40)
    with pytest.raises(ValueError, match="multiples of downsample_factor=16"):
        model(x, mask)
    x, mask = _batch([30], 48)
    with pytest.raises(ValueError, match="square"):
        model(x[..., :32], mask[..., :32])


def test_loss_is_masked_mse_plus_beta_times_commitment():
    model = _model()
    x, mask = _batch([37, 20], 48)
    out = model(x, mask)
    n = 3 * (37**2 + 20**2)
    recon_loss = (
        sum(
            ((out.recon[b, :, :n_, :n_] - x[b, :, :n_, :n_]) ** 2).sum()
            for b, n_ in enumerate([37, 20])
        )
        / n
    )
    torch.testing.assert_close(out.loss_sum / out.weight, recon_loss)
    commit = out.metrics["commit_loss"].sum()
    torch.testing.assert_close(out.aux_loss, 0.25 * commit)
    torch.testing.assert_close(out.loss, recon_loss + 0.25 * commit)
    assert commit > 0


def test_gradients_reach_every_encoder_through_the_straight_through_estimator():
    model = _model().train()
    x, mask = _batch([37, 20], 48)
    out = model(x, mask)
    (out.loss_sum / out.weight).backward()  # no commitment term: the STE is the only path
    for level, encoder in enumerate(model.encoders):
        grad = encoder.down.stages[0][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0, level
    for quantizer in model.quantizers:
        assert quantizer.proj.weight.grad.abs().sum() > 0


def test_decode_of_encode_equals_the_forward_reconstruction():
    model = _model()
    lengths = [37, 20, 48]
    x, mask = _batch(lengths, 48, seed=5)
    indices = model.encode(x, mask)
    recon = model(x, mask).recon
    assert torch.equal(model.decode(indices, lengths), recon)
    # values outside a protein's valid codes are ignored
    noisy = [torch.where(i < 0, torch.randint_like(i, CFG.codebook_size), i) for i in indices]
    assert torch.equal(model.decode(noisy, torch.tensor(lengths)), recon)
    with pytest.raises(ValueError):
        model.decode(indices[1:], lengths)
    with pytest.raises(ValueError):
        model.decode([indices[0][:, :2, :2], *indices[1:]], lengths)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_proteins_output_does_not_depend_on_the_padding_of_its_batch(symmetric):
    model = _model(dataclasses.replace(CFG, symmetric_output=symmetric))
    x_alone, m_alone = _batch([37], 48, seed=7)
    alone = model(x_alone, m_alone)
    # the same protein in a batch padded to 96 with two other proteins
    x = torch.zeros(3, 3, 96, 96)
    x[1, :, :48, :48] = x_alone[0]
    others, m_others = _batch([90, 61], 96, seed=8)
    x[0], x[2] = others[0], others[1]
    mask = mask_from_lengths([90, 37, 61], 96)
    batched = model(x, mask)
    torch.testing.assert_close(batched.recon[1, :, :48, :48], alone.recon[0], atol=1e-4, rtol=0)
    for a, b in zip(alone.codes, batched.codes, strict=True):
        n = a.shape[-1]
        assert torch.equal(b[1, :n, :n], a[0])


def test_symmetrise_builds_channel0_from_two_symmetrised_maps():
    y = torch.randn(2, 4, 5, 5)
    out = symmetrise(y)
    assert out.shape == (2, 3, 5, 5)
    d = (y[:, 0] + y[:, 0].transpose(1, 2)) / 2
    omega = (y[:, 1] + y[:, 1].transpose(1, 2)) / 2
    for i in range(5):
        for j in range(5):
            expected = omega[:, i, j] if j > i else d[:, i, j]
            torch.testing.assert_close(out[:, 0, i, j], expected)
    torch.testing.assert_close(out[:, 1:], y[:, 2:])


def test_symmetric_output_predicts_d_and_omega_from_both_triangles():
    model = _model(HierarchicalConfig.preset("tiny", symmetric_output=True))
    assert model.head.out.out_channels == 4
    x, mask = _batch([30], 32)
    out = model(x, mask).recon
    raw = {}
    model.head.out.register_forward_hook(lambda mod, i, o: raw.setdefault("y", o))
    model(x, mask)
    expected = symmetrise(raw["y"]) * mask[:, None]
    torch.testing.assert_close(out, expected)


def test_a_few_steps_of_training_reduce_the_loss():
    torch.manual_seed(0)
    model = HierarchicalVQVAE(HierarchicalConfig.preset("tiny"))
    # smooth, structured images (distance-map-like), not noise
    t = torch.linspace(0, 1, 32)
    base = torch.stack(
        [
            (t[:, None] - t[None, :]).abs(),
            torch.sin(6 * t)[:, None] * t,
            torch.cos(4 * t)[None, :] * t[:, None],
        ]
    )
    x = torch.stack([base * s for s in (0.5, 0.8, 1.0, -0.7)])
    mask = torch.ones(4, 32, 32, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(x, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.loss_sum / out.weight).item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])  # worst of 6 seeds: 0.38
