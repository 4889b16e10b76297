"""The ``protoken`` command.

Each subcommand lives in the module that implements it; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen subcommand's module is
imported, so ``protoken convert`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("protoken.convert", "structure files -> 6D images (PNG) + FASTA, binned by length"),
    "reconstruct": ("protoken.reconstruct", "6D images -> 3D structures (PDB), with metrics"),
    "train": ("protoken.train", "train the hierarchical VQ-VAE (single process or torchrun)"),
    "encode": ("protoken.tokenizer", "structures or images -> tokens (.npz)"),
    "decode": ("protoken.tokenizer", "tokens -> images -> 3D structures"),
    "evaluate": ("protoken.evaluate", "round-trip structures through a tokenizer and report"),
    "demo": ("protoken.demo", "convert bundled structures, train a tiny tokenizer, evaluate"),
}


def _top_parser() -> argparse.ArgumentParser:
    from protoken import __version__

    lines = [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="protoken",
        description="Protein structures <-> 6D images <-> discrete tokens.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `protoken COMMAND --help` for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"protoken {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (imports its module)."""
    module_name, text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"protoken {command}", description=text)
    add = getattr(module, f"add_{command}_arguments", None) or module.add_arguments
    add(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2  # not reached: argparse exits on --help or a bad command
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    args = build_parser(command).parse_args(rest)
    run = getattr(module, f"run_{command}", None) or module.run
    from protoken.checkpoint import CheckpointError

    try:
        return int(run(args) or 0)
    except CheckpointError as exc:  # one line naming the file, whichever command loaded it
        print(f"protoken {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
