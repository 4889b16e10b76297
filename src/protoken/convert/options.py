"""The options of a conversion run (``protoken convert --help``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from protoken.convert_settings import OUTPUT_SETTINGS
from protoken.geometry import DMAX
from protoken.shards import DEFAULT_SHARD_BYTES
from protoken.structure import DEFAULT_MAX_BYTES

__all__ = ["FORMATS", "ConvertOptions"]

#: Output formats: one PNG (and FASTA) per chain, or tar shards with an index.
FORMATS = ("png", "shards")


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion run (see ``protoken convert --help``)."""

    out: str
    fasta_dir: str | None = None
    chains: str = "skip-multi"
    models: str = "skip-multi"
    min_len: int = 40
    max_len: int = 1024
    dmax: float = DMAX
    bit_depth: int = 8
    delete_source: bool = False
    timeout: float = 300.0
    max_bytes: int = DEFAULT_MAX_BYTES
    retry_failed: bool = False
    follow_links: bool = False
    format: str = "png"
    shard_bytes: int = DEFAULT_SHARD_BYTES

    @property
    def fasta_folder(self) -> str:
        return self.fasta_dir or os.path.join(self.out, "fasta")

    def settings(self) -> dict:
        """The values of :data:`~protoken.convert_settings.OUTPUT_SETTINGS` (what
        ``convert.json`` records)."""
        return {key: getattr(self, key) for key in OUTPUT_SETTINGS}
