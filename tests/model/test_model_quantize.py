"""VectorQuantizer: nearest code, EMA formula, dead-code restart, STE, autocast, DDP sync."""

import inspect
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protoken.model.quantize import VectorQuantizer

# Five tokens in a 1 x 5 grid of 2-D vectors; the last one is padding.
TOKENS = torch.tensor([[1.0, 0.0], [9.0, 1.0], [11.0, -1.0], [0.0, 0.5], [100.0, 100.0]])
MASK = torch.tensor([[[True, True, True, True, False]]])
CODES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def _grid(tokens):  # (N, D) -> (1, D, 1, N)
    return tokens.t().reshape(1, tokens.shape[1], 1, -1).clone()


def _identity_vq(dim=2, size=3, **kw) -> VectorQuantizer:
    """A quantiser whose 1x1 projection is the identity, with codebook CODES."""
    vq = VectorQuantizer(dim, dim, size, **kw)
    with torch.no_grad():
        vq.proj.weight.copy_(torch.eye(dim).reshape(dim, dim, 1, 1))
        vq.proj.bias.zero_()
        if size == 3 and dim == 2:
            vq.embed.copy_(CODES)
            vq.embed_avg.copy_(2.0 * CODES)
            vq.cluster_size.fill_(2.0)
        vq.initialised.fill_(True)
    return vq


def test_nearest_code_matches_cdist():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 8, 37)
    z = torch.randn(1000, 8) * 2
    expected = torch.cdist(z, vq.embed).argmin(dim=1)
    assert torch.equal(vq.nearest(z), expected)


def test_eval_forward_indices_loss_and_padding():
    vq = _identity_vq().eval()
    out = vq(_grid(TOKENS), MASK)
    assert out.indices.tolist() == [[[0, 1, 1, 0, -1]]]
    q = out.quantized[0, :, 0].t()
    torch.testing.assert_close(q, torch.tensor([[0, 0], [10, 0], [10, 0], [0, 0], [0, 0.0]]))
    # mean over the 4 valid tokens and 2 features of (z - q)^2
    sq = (1 + 0) + (1 + 1) + (1 + 1) + (0 + 0.25)
    torch.testing.assert_close(out.commit_loss, torch.tensor(sq / 8))
    torch.testing.assert_close(out.usage, torch.tensor(2 / 3))
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))  # two codes, 50/50
    assert torch.equal(vq.embed, CODES)  # no update in eval mode


def test_ema_update_equals_the_formula_by_hand():
    decay, eps = 0.9, 1e-3
    vq = _identity_vq(decay=decay, eps=eps, dead_code_threshold=0).train()
    vq(_grid(TOKENS), MASK)
    # assignments 0, 1, 1, 0 (padding ignored): n = [2, 2, 0]
    N = [0.9 * 2 + 0.1 * 2, 0.9 * 2 + 0.1 * 2, 0.9 * 2 + 0.1 * 0]  # [2.0, 2.0, 1.8]
    m = [
        [0.9 * 0 + 0.1 * (1 + 0), 0.9 * 0 + 0.1 * (0 + 0.5)],
        [0.9 * 20 + 0.1 * (9 + 11), 0.9 * 0 + 0.1 * (1 - 1)],
        [0.9 * 0 + 0.1 * 0, 0.9 * 20 + 0.1 * 0],
    ]
    total = sum(N)
    smoothed = [(n + eps) / (total + 3 * eps) * total for n in N]
    expected = torch.tensor([[mk / s for mk in row] for row, s in zip(m, smoothed, strict=True)])
    torch.testing.assert_close(vq.cluster_size, torch.tensor(N))
    torch.testing.assert_close(vq.embed_avg, torch.tensor(m))
    torch.testing.assert_close(vq.embed, expected)


def test_dead_codes_restart_from_valid_batch_vectors():
    torch.manual_seed(0)
    vq = _identity_vq(dead_code_threshold=0.5).train()
    with torch.no_grad():
        vq.cluster_size.copy_(torch.tensor([2.0, 2.0, 0.01]))  # code 2 is dead
    vq(_grid(TOKENS), MASK)
    valid = TOKENS[:4]
    assert any(torch.equal(vq.embed[2], t) for t in valid)  # never the padded [100, 100]
    mean_after_ema = (0.99 * torch.tensor([2.0, 2.0, 0.01]) + 0.01 * torch.tensor([2, 2, 0])).mean()
    torch.testing.assert_close(vq.cluster_size[2], mean_after_ema)
    torch.testing.assert_close(vq.embed_avg[2], vq.embed[2] * mean_after_ema)
    # the restarted code now wins the token it was copied from
    vq.eval()
    i = [torch.equal(vq.embed[2], t) for t in valid].index(True)
    assert vq(_grid(TOKENS), MASK).indices[0, 0, i] == 2


def test_restart_never_duplicates_when_codes_outnumber_vectors():
    torch.manual_seed(0)
    vq = _identity_vq(size=16, dead_code_threshold=0.5).train()
    with torch.no_grad():
        vq.cluster_size.copy_(torch.tensor([1.0] * 4 + [0.001] * 12))  # 12 dead codes
    before = vq.embed.clone()
    assert vq.restart_dead_codes(TOKENS[:4]) == 4  # only 4 candidate vectors
    changed = [i for i in range(16) if not torch.equal(vq.embed[i], before[i])]
    assert changed == [4, 5, 6, 7]  # the first dead codes, in index order
    new = {tuple(vq.embed[i].tolist()) for i in changed}
    assert new == {tuple(t.tolist()) for t in TOKENS[:4]}  # each token once


def test_first_training_step_initialises_codes_from_valid_tokens():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, 16).train()
    with torch.no_grad():
        vq.proj.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        vq.proj.bias.zero_()
    assert not vq.initialised
    out = vq(_grid(TOKENS), MASK)
    assert vq.initialised
    d = torch.cdist(TOKENS[:4], vq.embed)  # each valid token has its own code (after 1 EMA step)
    assert d.min(dim=1).values.max() < 1e-3
    assert len(set(out.indices[MASK].tolist())) == 4
    assert (torch.cdist(TOKENS[4:], vq.embed) > 50).all()  # the padded token was never drawn


def test_codes_left_unused_after_initialisation_restart_within_tens_of_steps():
    """The encoder's outputs move fast early in training; codes must follow within steps."""
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, 8).train()
    with torch.no_grad():
        vq.proj.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        vq.proj.bias.zero_()
    first = torch.randn(8, 2)
    vq(_grid(first), torch.ones(1, 1, 8, dtype=torch.bool))  # init: codes = these 8 vectors
    moved = torch.randn(4, 2) + 50.0  # later batches are somewhere else entirely
    # one code takes all of them; the others' EMA mass, counted from zero at init, falls below
    # 3% of the mean after 52 steps here (had they started with the mean: after ~350)
    for _ in range(60):
        vq(_grid(moved), torch.ones(1, 1, 4, dtype=torch.bool))
    assert torch.cdist(moved, vq.embed).min(dim=1).values.max() < 1e-3
    assert (
        len(
            set(
                vq.eval()(_grid(moved), torch.ones(1, 1, 4, dtype=torch.bool))
                .indices.flatten()
                .tolist()
            )
        )
        == 4
    )


def test_straight_through_gradient_is_identity_on_valid_tokens():
    vq = _identity_vq().train()
    x = _grid(TOKENS).requires_grad_()
    out = vq(x, MASK)
    weights = torch.arange(10.0).reshape(1, 2, 1, 5)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights * MASK[:, None].float())


def test_distances_and_ema_in_float32_under_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, 64).train()
    x = torch.randn(2, 16, 4, 4)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(x, mask)
    assert out.quantized.dtype == torch.float32 and out.commit_loss.dtype == torch.float32
    assert vq.embed.dtype == vq.embed_avg.dtype == vq.cluster_size.dtype == torch.float32
    vq.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_autocast = vq(x, mask).indices
    assert torch.equal(idx_autocast, vq(x, mask).indices)


# -- DDP: 2 processes on gloo ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, 5, generator=g)  # one image per rank
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0, :5, :5] = True
    mask[1, :3, :3] = True  # ranks see different numbers of valid tokens
    return x, mask


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, mask = _batches()
        torch.manual_seed(0)  # same initial weights and codebook on both ranks
        vq = VectorQuantizer(6, 4, 8, decay=0.9, dead_code_threshold=0.0).train()
        vq.initialised.fill_(True)
        vq(x[rank : rank + 1], mask[rank : rank + 1])
        ema = {k: v.clone() for k, v in vq.state_dict().items()}
        torch.manual_seed(100 + rank)  # restarts draw different local samples on each rank
        restarted = vq.restart_dead_codes(
            vq.proj(x[rank : rank + 1]).permute(0, 2, 3, 1)[mask[rank : rank + 1]], 0.99
        )
        state = {k: v.clone() for k, v in vq.state_dict().items()}
        state |= {"restarted": restarted, "ema": ema}

        # a DDP-wrapped tiny VQ-VAE: identical parameters and codebooks after a step
        from torch.nn.parallel import DistributedDataParallel as DDP

        from protoken.model import HierarchicalConfig, HierarchicalVQVAE, mask_from_lengths

        torch.manual_seed(rank)  # different init on purpose: DDP must broadcast it
        # buffers are synced once at construction, never in forward: equal codebooks after
        # training can only come from the quantiser's own all-reduce
        no_sync = {"forward_sync_buffers": False}
        if "forward_sync_buffers" not in inspect.signature(DDP).parameters:
            no_sync = {"broadcast_buffers": False}
        model = DDP(
            HierarchicalVQVAE(HierarchicalConfig.preset("tiny", codebook_size=32)), **no_sync
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        lengths = [[20, 32], [17, 29]][rank]
        m = mask_from_lengths(lengths, 32)
        img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * m[:, None]
        for _ in range(2):
            out = model(img, m)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        state["model"] = {k: v.clone() for k, v in model.module.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_ranks_share_ema_statistics_and_restarts():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))

    # single-process reference: one EMA step on both ranks' valid tokens together
    x, mask = _batches()
    torch.manual_seed(0)
    ref = VectorQuantizer(6, 4, 8, decay=0.9, dead_code_threshold=0.0).train()
    ref.initialised.fill_(True)
    ref(x, mask)
    for key in ("cluster_size", "embed_avg"):
        torch.testing.assert_close(r0["ema"][key], ref.state_dict()[key])
        torch.testing.assert_close(r1["ema"][key], ref.state_dict()[key])
    # restarts agree across ranks and draw on both ranks' vectors
    assert r0["restarted"] == r1["restarted"] > 0
    for key in ("embed", "embed_avg", "cluster_size"):
        assert torch.equal(r0[key], r1[key])
    with torch.no_grad():
        z = ref.proj(x).permute(0, 2, 3, 1)
    pool = [z[0][mask[0]], z[1][mask[1]]]
    new = r0["embed"][~torch.isclose(r0["embed"], ref.embed).all(dim=1)]
    sources = {r for v in new for r in range(2) if (pool[r] - v).abs().sum(1).min() < 1e-5}
    assert sources == {0, 1}
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key
