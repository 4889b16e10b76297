"""``protoken demo``: the README's main job on the bundled example structures."""

from __future__ import annotations

import argparse
import os
from importlib import resources

__all__ = ["bundled_structures", "run"]


def bundled_structures() -> str:
    """Folder of the example structures shipped inside the package."""
    return str(resources.files("protoken").joinpath("resources/structures"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="protoken-demo", help="output folder (default ./protoken-demo)"
    )
    parser.add_argument("--workers", type=int, default=None, help="conversion workers")


def run(args: argparse.Namespace) -> int:
    from protoken.convert import ConvertOptions, convert

    images = os.path.join(args.out, "images")
    summary = convert([bundled_structures()], ConvertOptions(out=images), workers=args.workers)
    print(summary.text())
    print(f"images: {images}")
    return 0
