"""HierarchicalConfig: presets, serialisation, validation, parameter counts."""

import json

import pytest
import torch

from protoken.model import (
    HIERARCHICAL_PRESETS,
    HierarchicalConfig,
    HierarchicalVQVAE,
    preset_config,
)


def _n_params(config: HierarchicalConfig) -> int:
    with torch.device("meta"):  # no memory for the 180M-parameter reference model
        return HierarchicalVQVAE(config).num_parameters()


def test_reference_preset_has_the_reference_designs_values():
    c = HierarchicalConfig.preset("reference")
    assert (c.n_embd, c.mlp_hidden_dim, c.n_head, c.attn_dim) == (1024, 2048, 16, 256)
    assert (c.codebook_size, c.codebook_dim) == (4096, 1024)
    assert (c.n_layer_encoder, c.n_layer_decoder, c.beta) == (2, 2, 0.25)
    assert c.scaling_rates == (2,) * 6 and c.downsample_factor == 64
    assert (c.ema_decay, c.ema_eps) == (0.99, 1e-5)
    # global attention where a 1024-residue image gives <= 32 x 32 tokens (scale >= 32)
    assert c.window_sizes == (8, 8, 8, 8, 0, 0)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 200_000, 1_000_000), ("small", 5_000_000, 30_000_000), ("reference", 1.5e8, 2.2e8)],
)
def test_preset_parameter_counts(name, low, high):
    assert low <= _n_params(HIERARCHICAL_PRESETS[name]) < high


def test_block_parameter_count_matches_formula():
    c = HierarchicalConfig.preset("tiny")
    model = HierarchicalVQVAE(c)
    block = model.encoders[0].transformer.blocks[0]
    e, m, d = c.n_embd, c.mlp_hidden_dim, c.attn_dim
    expected = 2 * 2 * e + e * 3 * d + (d * e + e) + (e * m + m) + (m * e + e)
    assert sum(p.numel() for p in block.parameters() if p.requires_grad) == expected


def test_codebooks_are_buffers_not_parameters():
    c = HierarchicalConfig.preset("tiny")
    model = HierarchicalVQVAE(c)
    names = {n for n, _ in model.named_buffers()}
    assert "quantizers.0.embed" in names and "quantizers.0.cluster_size" in names
    assert not any(
        "embed" in n and "quantizers" in n
        for n, _ in model.named_parameters()
        if n.endswith(("embed", "embed_avg"))
    )


def test_dict_round_trip_through_json():
    c = HierarchicalConfig.preset("small", symmetric_output=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert HierarchicalConfig.from_dict(d) == c
    assert d["scaling_rates"] == [2, 2, 2, 2, 2]


def test_from_dict_rejects_unknown_fields():
    d = HierarchicalConfig.preset("tiny").to_dict() | {"n_layers": 3}
    with pytest.raises(ValueError, match="n_layers"):
        HierarchicalConfig.from_dict(d)


def test_preset_override_of_rates_rederives_windows():
    c = HierarchicalConfig.preset("reference", scaling_rates=(4, 4, 2))
    assert c.downsample_factor == 32 and c.level_scales == (4, 16, 32)
    assert c.window_sizes == (8, 8, 0)
    with pytest.raises(KeyError):
        HierarchicalConfig.preset("huge")


@pytest.mark.parametrize(
    "bad",
    [
        {"scaling_rates": (3, 2)},
        {"scaling_rates": ()},
        {"window_sizes": (8,)},
        {"attn_dim": 30, "n_head": 4},
        {"rope_dim": 6},
        {"dead_code_threshold": 1.0},
        {"symmetric_output": True, "in_channels": 4},
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        HierarchicalConfig(**bad)


def test_old_names_still_load():
    """Configs and checkpoints written before the renames: ``latent_dim`` is ``attn_dim``,
    the ``seed`` preset is ``reference``."""
    old = HierarchicalConfig.preset("tiny").to_dict()
    old["latent_dim"] = old.pop("attn_dim")
    assert HierarchicalConfig.from_dict(old) == HierarchicalConfig.preset("tiny")
    assert (
        HierarchicalConfig.preset("seed")
        == HierarchicalConfig.preset("reference")
        == HierarchicalConfig()
    )
    # an old TrainConfig's model overrides, applied to an old preset name
    c = HierarchicalConfig.preset("seed", latent_dim=64, n_head=4)
    assert c.attn_dim == 64 and "latent_dim" not in c.to_dict()
    with pytest.raises(ValueError, match="latent_dim"):
        HierarchicalConfig.from_dict(old | {"attn_dim": 64})
    # the family factory (what TrainConfig uses) reads the old preset name too
    assert preset_config("seed", {"latent_dim": 64, "n_head": 4}) == c
