"""Shared test fixtures: the real structures of ../shared and images converted from them.

The test data live outside the repository, in ``../shared/data`` (282 real structures and the
bad inputs). Set PROTOKEN_SHARED to point elsewhere. A missing folder fails the tests that need
it with a clear message rather than skipping them silently.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_candidates() -> list[Path]:
    env = os.environ.get("PROTOKEN_SHARED")
    found = [Path(env)] if env else []
    return found + [REPO.parent / "shared", Path("/work/shared")]


def shared_dir() -> Path:
    for cand in _shared_candidates():
        if (cand / "data" / "structures" / "MANIFEST.tsv").is_file():
            return cand
    pytest.fail(
        "test data not found: expected ../shared/data/structures/MANIFEST.tsv next to the "
        f"repository (looked in {', '.join(map(str, _shared_candidates()))}); "
        "set PROTOKEN_SHARED to the folder holding data/structures and data/bad-inputs",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder (fails with a clear message when absent)."""
    return shared_dir()


@pytest.fixture(scope="session")
def structures_dir(shared) -> Path:
    return shared / "data" / "structures"


@pytest.fixture(scope="session")
def bad_inputs_dir(shared) -> Path:
    return shared / "data" / "bad-inputs"


@pytest.fixture(scope="session")
def manifest(structures_dir) -> dict[str, dict[str, str]]:
    """MANIFEST.tsv of ../shared/data/structures: file name -> row."""
    with open(structures_dir / "MANIFEST.tsv", newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


def single_chain_files(manifest: dict[str, dict[str, str]], lo=40, hi=1024) -> list[str]:
    """Files holding one protein chain of lo..hi residues in one model (166 with defaults)."""
    out = []
    for name, row in sorted(manifest.items()):
        if row["n_models"] == "1" and row["n_chains"] == "1":
            if lo <= int(row["n_protein_residues_first_chain"]) <= hi:
                out.append(name)
    return out


@pytest.fixture(scope="session")
def single_chain(manifest) -> list[str]:
    return single_chain_files(manifest)


def _convert(structures_dir: Path, names: list[str], out: Path, bit_depth: int) -> Path:
    from protoken.convert import ConvertOptions, convert

    convert(
        [str(structures_dir / n) for n in names],
        ConvertOptions(out=str(out), bit_depth=bit_depth),
        workers=2,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def converted8(tmp_path_factory, structures_dir, single_chain) -> Path:
    """Every single-chain structure of ../shared converted to 8-bit PNGs (session-wide)."""
    return _convert(structures_dir, single_chain, tmp_path_factory.mktemp("conv8"), 8)


@pytest.fixture(scope="session")
def converted16(tmp_path_factory, structures_dir, single_chain) -> Path:
    """Every single-chain structure of ../shared converted to 16-bit PNGs (session-wide)."""
    return _convert(structures_dir, single_chain, tmp_path_factory.mktemp("conv16"), 16)
