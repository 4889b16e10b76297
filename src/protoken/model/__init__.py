"""Hierarchical VQ-VAE that tokenizes 6D protein images (seed section 3).

>>> from protoken.model import VQVAE, VQVAEConfig, mask_from_lengths
>>> model = VQVAE(VQVAEConfig.preset("tiny"))
>>> out = model(x, mask)                   # x (B, 3, H, W), mask (B, H, W) bool
>>> codes = model.encode(x, mask)          # list of (B, h_l, w_l) int64, coarsest first
>>> images = model.decode(codes, lengths)  # (B, 3, H, W)
"""

from protoken.model.config import PRESETS, VQVAEConfig
from protoken.model.quantize import QuantizerOutput, VectorQuantizer
from protoken.model.vqvae import VQVAE, VQVAEOutput, mask_from_lengths, symmetrise

__all__ = [
    "PRESETS",
    "VQVAE",
    "QuantizerOutput",
    "VQVAEConfig",
    "VQVAEOutput",
    "VectorQuantizer",
    "mask_from_lengths",
    "symmetrise",
]
