"""Attention over token grids: masking, windows, 2D rotary embeddings."""

import math

import pytest
import torch
from rotary_embedding_torch import apply_rotary_emb

from protoken.model import HierarchicalConfig
from protoken.model.transformer import Attention, Transformer

CFG = HierarchicalConfig.preset("tiny", n_embd=16, attn_dim=16, n_head=2, rope_dim=8)


def _reference_attention(attn: Attention, x, mask, groups):
    """Brute force: each token attends to the valid tokens of its own group (window id)."""
    B, h, w, _ = x.shape
    nh = attn.n_head
    hd = attn.qkv.out_features // 3 // nh
    q, k, v = attn.qkv(x).split(attn.qkv.out_features // 3, dim=-1)
    freqs = attn.rotary.get_axial_freqs(h, w)  # (h, w, rope_dim), absolute positions
    out = torch.zeros(B, h, w, nh * hd)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                keys = [
                    (a, c)
                    for a in range(h)
                    for c in range(w)
                    if mask[b, a, c] and groups[a][c] == groups[i][j]
                ]
                if not keys:
                    continue
                for head in range(nh):
                    sl = slice(head * hd, (head + 1) * hd)
                    qi = apply_rotary_emb(freqs[i, j], q[b, i, j, sl])
                    ks = torch.stack(
                        [apply_rotary_emb(freqs[a, c], k[b, a, c, sl]) for a, c in keys]
                    )
                    vs = torch.stack([v[b, a, c, sl] for a, c in keys])
                    wgt = torch.softmax(ks @ qi / math.sqrt(hd), dim=0)
                    out[b, i, j, sl] = wgt @ vs
    return attn.proj(out)


def _groups(h, w, window, shift):
    if window == 0:
        return [[0] * w for _ in range(h)]
    return [[((i + shift) // window, (j + shift) // window) for j in range(w)] for i in range(h)]


@pytest.mark.parametrize(("window", "shift"), [(0, 0), (4, 0), (4, 2), (3, 1)])
def test_attention_matches_brute_force_with_padding(window, shift):
    torch.manual_seed(0)
    attn = Attention(CFG)
    h = w = 7
    x = torch.randn(2, h, w, CFG.n_embd)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, :5, :5] = True
    mask[1] = True
    got = attn(x, mask, window, shift)
    ref = _reference_attention(attn, x, mask, _groups(h, w, window, shift))
    valid = mask.unsqueeze(-1).expand_as(got)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-4)


def test_padded_tokens_do_not_influence_valid_ones():
    torch.manual_seed(0)
    stage = Transformer(HierarchicalConfig.preset("tiny", n_layer_encoder=2), 2, window=4)
    x = torch.randn(2, 64, 10, 10)
    mask = torch.zeros(2, 10, 10, dtype=torch.bool)
    mask[:, :6, :6] = True
    y = stage(x, mask)
    x2 = x.clone()
    x2[:, :, 6:] = 1e3 * torch.randn_like(x2[:, :, 6:])
    x2[:, :, :, 6:] = -7.0
    y2 = stage(x2, mask)
    torch.testing.assert_close(y, y2)
    assert y[:, :, 6:].abs().max() == 0 and y[:, :, :, 6:].abs().max() == 0


def test_windows_are_independent_without_shift():
    torch.manual_seed(0)
    attn = Attention(CFG)
    x = torch.randn(1, 8, 8, CFG.n_embd)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    y = attn(x, mask, window=4)
    x2 = x.clone()
    x2[:, 4:, 4:] += 1.0  # bottom-right window only
    y2 = attn(x2, mask, window=4)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    torch.testing.assert_close(y[:, 4:, :4], y2[:, 4:, :4])
    assert not torch.allclose(y[:, 4:, 4:], y2[:, 4:, 4:])


def test_rotary_makes_attention_depend_on_relative_position_in_2d():
    """Translating the content inside a zero-padded grid translates the output (relative
    positions), while transposing it does not transpose the output (rows != columns)."""
    torch.manual_seed(0)
    attn = Attention(CFG)
    content = torch.randn(1, 4, 5, CFG.n_embd)
    x = torch.zeros(1, 9, 9, CFG.n_embd)
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    x[:, :4, :5], m[:, :4, :5] = content, True
    y = attn(x, m)[:, :4, :5]
    x_shift = torch.zeros_like(x)
    m_shift = torch.zeros_like(m)
    x_shift[:, 3:7, 2:7], m_shift[:, 3:7, 2:7] = content, True
    y_shift = attn(x_shift, m_shift)[:, 3:7, 2:7]
    torch.testing.assert_close(y, y_shift, atol=1e-5, rtol=1e-4)
    sq = torch.randn(1, 5, 5, CFG.n_embd)
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    y_t = attn(sq.transpose(1, 2), full).transpose(1, 2)
    assert not torch.allclose(attn(sq, full), y_t, atol=1e-3)


def test_residual_projections_start_small_as_in_nanogpt():
    torch.manual_seed(0)
    config = HierarchicalConfig.preset("tiny", n_layer_encoder=3)
    stack = Transformer(config, n_layer=3, window=0)
    projections = [p for b in stack.blocks for p in (b.attn.proj, b.mlp.proj)]
    weights = torch.cat([p.weight.flatten() for p in projections])
    assert weights.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert abs(weights.mean().item()) < 1e-3
    assert all((p.bias == 0).all() for p in projections)
    # every other layer keeps PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    qkv = stack.blocks[0].attn.qkv.weight
    bound = 1 / math.sqrt(config.n_embd)
    assert qkv.abs().max().item() <= bound and qkv.std().item() > 0.5 * bound
