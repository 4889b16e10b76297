"""The ``protoken`` command: argument parsing and wiring, nothing else.

Each subcommand is a pair of functions here, ``_NAME_arguments(parser)`` and
``_NAME(args) -> int``, that call the library (``train`` keeps its own in
:mod:`protoken.train`). Options shared by several commands are declared once, as the option
groups below (structure filters, codec settings, shards, progress, structure output). Library
modules are imported inside the run functions, so that ``protoken convert`` never pays for
importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from protoken.inputs import parse_shard

# --------------------------------------------------------------------------- option groups


def _structure_filters(parser: argparse.ArgumentParser) -> None:
    """``--chains``, ``--models``, ``--min-len``, ``--max-len``: which chains of a structure
    file become an image (:func:`protoken.structure.read_backbones`)."""
    from protoken.structure import CHAIN_POLICIES, MODEL_POLICIES

    group = parser.add_argument_group("structure filters")
    group.add_argument(
        "--chains",
        choices=CHAIN_POLICIES,
        default="skip-multi",
        help="files with several protein chains: skip them (default, as the reference "
        "design), one image per chain (id STEM_CHAIN), or the first chain",
    )
    group.add_argument(
        "--models",
        choices=MODEL_POLICIES,
        default="skip-multi",
        help="files with several models: skip them (default) or use the first",
    )
    group.add_argument("--min-len", type=int, default=40, help="minimum residues (default 40)")
    group.add_argument("--max-len", type=int, default=1024, help="maximum residues (default 1024)")


def _codec_options(parser: argparse.ArgumentParser, bit_depth: bool = True) -> None:
    """``--dmax`` (and ``--bit-depth``): how 6D features are stored in an image."""
    from protoken.geometry import DMAX

    group = parser.add_argument_group("image codec")
    group.add_argument(
        "--dmax", type=float, default=DMAX, help="distance cut-off in Angstrom (default 80)"
    )
    if bit_depth:
        group.add_argument(
            "--bit-depth",
            type=int,
            choices=[8, 16],
            default=8,
            help="PNG bit depth: 8 (default, as the reference design) or 16 (near lossless)",
        )


def _shard_type(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard(parser: argparse.ArgumentParser, what: str) -> None:
    """``--shard I/N`` (:func:`protoken.inputs.in_shard`)."""
    parser.add_argument(
        "--shard",
        type=_shard_type,
        default=None,
        metavar="I/N",
        help=f"{what} only shard I of N (md5 of each input's path relative to its input "
        "folder), e.g. one per SLURM array task",
    )


def _workers(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    default_text = "all cores" if default is None else str(default)
    parser.add_argument(
        "--workers", "-j", type=int, default=default, help=f"{what} (default: {default_text})"
    )


def _progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _structure_output(parser: argparse.ArgumentParser) -> None:
    """``--backbone`` and ``--format``: what reconstructed structure files hold."""
    parser.add_argument(
        "--backbone", action="store_true", help="full backbone N, CA, C, O, CB (default: CB only)"
    )
    parser.add_argument("--format", choices=["pdb", "cif"], default="pdb", help="output format")


def _checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", "-c", required=True, help="best.pt / last.pt of a protoken train run"
    )


def _fail(command: str, message) -> int:
    print(f"protoken {command}: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- convert


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="structure files or folders (walked recursively)"
    )
    parser.add_argument("--out", "-o", required=True, help="output folder")
    parser.add_argument("--fasta-dir", help="FASTA folder (default OUT/fasta)")
    _workers(parser, None, "worker processes")
    _structure_filters(parser)
    _codec_options(parser)
    _shard(parser, "convert")
    parser.add_argument(
        "--delete-source",
        action="store_true",
        help="delete each input once all its outputs were written and verified "
        "(never a skipped or failed input)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds allowed per file before it is recorded as failed",
    )
    _progress(parser)


def _convert(args: argparse.Namespace) -> int:
    from protoken.convert import ConvertOptions, convert, manifest_path

    opts = ConvertOptions(
        out=args.out,
        fasta_dir=args.fasta_dir,
        chains=args.chains,
        models=args.models,
        min_len=args.min_len,
        max_len=args.max_len,
        dmax=args.dmax,
        bit_depth=args.bit_depth,
        delete_source=args.delete_source,
        timeout=args.timeout,
    )
    try:
        summary = convert(
            args.inputs, opts, workers=args.workers, shard=args.shard, progress=not args.no_progress
        )
    except (FileNotFoundError, ValueError) as exc:
        return _fail("convert", exc)
    print(summary.text())
    print(f"manifest: {manifest_path(opts.out, args.shard)}")
    return 0


# --------------------------------------------------------------------------- reconstruct


def _reconstruct_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="PNG images or folders (recursive)"
    )
    parser.add_argument("--out", "-o", required=True, help="output folder (DIR/ID.pdb)")
    parser.add_argument(
        "--fasta", metavar="FILE_OR_DIR", help="sequences: a FASTA file or a folder of ID.fasta"
    )
    parser.add_argument(
        "--reference",
        metavar="STRUCTURE_OR_DIR",
        help="reference structures matched by id; writes DIR/metrics.tsv and DIR/summary.json",
    )
    _codec_options(parser, bit_depth=False)
    _structure_output(parser)
    parser.add_argument(
        "--no-refine", action="store_true", help="classical MDS only (no distance refinement)"
    )
    _workers(parser, 1, "processes")


def _reconstruct(args: argparse.Namespace) -> int:
    import os

    from protoken.evaluate import reconstruct_images
    from protoken.inputs import find_images
    from protoken.report import summary_line

    try:
        images = list(find_images(args.inputs))
    except FileNotFoundError as exc:
        return _fail("reconstruct", exc)
    if not images:
        return _fail("reconstruct", "no .png images found")
    for opt in ("fasta", "reference"):
        value = getattr(args, opt)
        if value and not os.path.exists(value):
            return _fail("reconstruct", f"--{opt}: no such file or folder: {value}")
    rows, summary = reconstruct_images(
        images, args.out, fasta=args.fasta, reference=args.reference, dmax=args.dmax,
        refine=not args.no_refine, backbone=args.backbone, fmt=args.format, workers=args.workers,
    )  # fmt: skip
    for row in rows:
        if "error" in row:
            print(f"{row['id']}: failed: {row['error']}", file=sys.stderr)
        elif row.get("note"):
            print(f"{row['id']}: {row['note']}", file=sys.stderr)
    print(summary_line(summary))
    return 1 if summary["failed"] else 0


# --------------------------------------------------------------------------- encode / decode


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="structure files, PNG images, or folders of either")  # fmt: skip
    _checkpoint(parser)
    parser.add_argument("--out", "-o", required=True, help="token file to write (.npz)")
    _structure_filters(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="proteins per forward pass")
    _shard(parser, "encode")
    _progress(parser)


def _encode(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from protoken.inputs import find_inputs
    from protoken.tokenizer import Tokenizer, save_tokens

    tok = Tokenizer.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
    skipped = 0

    def skip(source, exc: Exception) -> None:
        nonlocal skipped
        skipped += 1
        tqdm.write(f"protoken encode: skipped {source}: {exc}", file=sys.stderr)

    paths = find_inputs(args.inputs, args.shard)  # streamed: no listing of millions of paths
    bar = tqdm(paths, desc="encode", unit="file", disable=args.no_progress, file=sys.stderr)
    try:
        tokens = list(tok.encode_many(bar, chains=args.chains, models=args.models,
                                      min_len=args.min_len, max_len=args.max_len,
                                      on_error=skip))  # fmt: skip
    except FileNotFoundError as exc:
        return _fail("encode", exc)
    if not tokens:
        return _fail("encode", "nothing encoded")
    save_tokens(args.out, tokens, tok.meta())
    per_res = np.mean([t.n_tokens / t.length for t in tokens])
    print(f"encoded {len(tokens)} proteins ({skipped} inputs skipped) into {args.out}; "
          f"{per_res:.2f} tokens per residue on average")  # fmt: skip
    return 0


def _decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tokens", metavar="FILE", help="token file written by protoken encode")
    _checkpoint(parser)
    parser.add_argument("--out", "-o", required=True, help="folder for ID.png and ID.pdb")
    _structure_output(parser)
    _progress(parser)


def _decode(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from protoken.codec import write_png
    from protoken.fileio import atomic_write
    from protoken.reconstruct import reconstruct
    from protoken.tokenizer import Tokenizer, load_tokens

    tok = Tokenizer.from_checkpoint(args.checkpoint)
    tokens, meta = load_tokens(args.tokens)
    if meta.get("checkpoint") and meta["checkpoint"] != tok.checkpoint:
        print(f"protoken decode: warning: tokens were made by checkpoint {meta['checkpoint']}, "
              f"decoding with {tok.checkpoint}", file=sys.stderr)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    for t in tqdm(tokens, desc="decode", unit="protein", disable=args.no_progress,
                  file=sys.stderr):  # fmt: skip
        image = tok.decode(t)
        write_png(os.path.join(args.out, f"{t.id}.png"), image, bit_depth=16)
        rec = reconstruct(image, dmax=tok.codec.dmax, backbone=args.backbone)
        text = rec.to_text(t.sequence or None, fmt=args.format)
        atomic_write(os.path.join(args.out, f"{t.id}.{args.format}"), text)
    print(f"decoded {len(tokens)} proteins into {args.out} (ID.png, ID.{args.format})")
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="structure files or folders (PNG images also accepted)")  # fmt: skip
    _checkpoint(parser)
    parser.add_argument("--out", "-o", required=True, help="report folder")
    parser.add_argument(
        "--backbone",
        action="store_true",
        help="rebuild the full backbone; report backbone RMSD and CA TM-score",
    )
    _workers(parser, None, "processes for the 3D reconstruction")
    _structure_filters(parser)
    _progress(parser)


def _evaluate(args: argparse.Namespace) -> int:
    from protoken.evaluate import evaluate
    from protoken.inputs import find_inputs
    from protoken.report import headline
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(args.checkpoint)
    try:
        summary = evaluate(tok, find_inputs(args.inputs), args.out, backbone=args.backbone,
                           workers=args.workers, progress=not args.no_progress,
                           chains=args.chains, models=args.models, min_len=args.min_len,
                           max_len=args.max_len,
                           log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        return _fail("evaluate", exc)
    print(headline(summary, args.out))
    return 0


# --------------------------------------------------------------------------- train, demo


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from protoken.train import add_arguments

    add_arguments(parser)


def _train(args: argparse.Namespace) -> int:
    from protoken.train import run

    return run(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="protoken-demo",
                        help="output folder (default ./protoken-demo)")  # fmt: skip
    parser.add_argument(
        "--max-steps",
        type=int,
        default=600,
        help="training steps (default 600, a few minutes on 2 CPU cores)",
    )
    _workers(parser, None, "processes")


def _demo(args: argparse.Namespace) -> int:
    from protoken.demo import demo

    demo(args.out, max_steps=args.max_steps, workers=args.workers)
    return 0


# --------------------------------------------------------------------------- the command

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (one-line help, add its arguments, run it)
COMMANDS: dict[str, Command] = {
    "convert": ("structure files -> 6D images (PNG) + FASTA, binned by length",
                _convert_arguments, _convert),
    "reconstruct": ("6D images -> 3D structures (PDB), with metrics",
                    _reconstruct_arguments, _reconstruct),
    "train": ("train the hierarchical VQ-VAE (single process or torchrun)",
              _train_arguments, _train),
    "encode": ("structures or images -> tokens (.npz)", _encode_arguments, _encode),
    "decode": ("tokens -> images -> 3D structures", _decode_arguments, _decode),
    "evaluate": ("round-trip structures through a tokenizer and report",
                 _evaluate_arguments, _evaluate),
    "demo": ("convert bundled structures, train a tiny tokenizer, evaluate",
             _demo_arguments, _demo),
}  # fmt: skip


def _top_parser() -> argparse.ArgumentParser:
    from protoken._version import __version__

    lines = [f"  {name:<12} {text}" for name, (text, _, _) in COMMANDS.items()]
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
    """The argument parser of one subcommand."""
    text, add_arguments, _ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"protoken {command}", description=text)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2  # not reached: argparse exits on --help or a bad command
    command, rest = argv[0], argv[1:]
    args = build_parser(command).parse_args(rest)
    from protoken.checkpoint import CheckpointError

    try:
        return int(COMMANDS[command][2](args) or 0)
    except CheckpointError as exc:  # one line naming the file, whichever command loaded it
        print(f"protoken {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
