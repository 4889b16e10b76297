"""The ``protoken`` command: argument parsing and wiring, nothing else.

Each subcommand is a pair of functions here, ``_NAME_arguments(parser)`` and
``_NAME(args) -> int``, that call the library. Options shared by several commands are declared
once, as the option groups below (structure filters, codec settings, shards, progress,
structure output). Library modules are imported inside the run functions, so that
``protoken convert`` never pays for importing torch.

Exit codes, one policy for every command (:func:`main`):

====  =====================================================================================
0     done: every input was processed; inputs that failed or were skipped are recorded (the
      manifest, ``failed.tsv``, ``skipped.tsv``) and named on stderr
1     nothing could be processed (no input, or every input failed), or the run itself failed
      (another run holds the output folder, a disk error, workers that cannot start)
2     usage: the command line cannot work as given (a bad option value, a missing input, an
      ``--out`` that is a file or not writable, an unreadable checkpoint or token file,
      settings that contradict ``convert.json``); nothing was processed
75    ``protoken train`` only: pre-empted, ``RUN/last.pt`` written; rerun with ``--resume``
128+N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM), after stopping the workers
====  =====================================================================================

Every error is one line on stderr, ``protoken COMMAND: ...``, never a traceback (set
``PROTOKEN_DEBUG=1`` to see one for an unexpected error).

One module of ~970 lines on purpose: every command's options in one place, so that the option
groups are declared once and every command's help, checks and exit codes read alike; what a
command does is in the library.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable

from protoken.inputs import parse_shard

#: Exit codes (see the module docstring).
EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75


class UsageError(ValueError):
    """The command line cannot work as given (exit code 2)."""


class _Signalled(BaseException):
    """Raised in the main thread by SIGTERM / SIGHUP, so cleanup runs (exit code 128 + N)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------- argument types


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, not {text}")
    return value


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, else a one-line reason."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _byte_size(text: str) -> int:
    """``1073741824``, ``512M``, ``2G`` (powers of 1024) -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(raw[-1:], 1)
    try:
        value = int(float(raw[:-1] if scale > 1 else raw) * scale)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512M or 2G, not {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def max_workers() -> int:
    """The most ``--workers`` accepted: 4 per available core (conversion is CPU-bound; more
    processes only cost memory and switching), at least 8."""
    from protoken.convert.pool import available_cores

    return max(8, 4 * available_cores())


def _workers_type(text: str) -> int:
    from protoken.convert.pool import available_cores

    value = _positive_int(text)
    if value > max_workers():
        raise argparse.ArgumentTypeError(
            f"{value} workers on {available_cores()} available cores: at most {max_workers()}"
        )
    return value


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
        "design), one image per chain (id STEM_CHAIN), the first chain, or one image of the "
        "whole complex (id STEM; chains in file order, the layout recorded; --min-len and "
        "--max-len apply to the whole complex)",
    )
    group.add_argument(
        "--models",
        choices=MODEL_POLICIES,
        default="skip-multi",
        help="files with several models: skip them (default) or use the first",
    )
    group.add_argument(
        "--min-len", type=_positive_int, default=40, help="minimum residues (default 40)"
    )
    _max_len(group)


def _max_len(parser) -> None:
    parser.add_argument(
        "--max-len",
        type=_positive_int,
        default=1024,
        help="maximum residues (default 1024); larger PNG images are refused from their header",
    )


def _codec_options(parser: argparse.ArgumentParser, bit_depth: bool = True) -> None:
    """``--dmax`` (and ``--bit-depth``): how 6D features are stored in an image."""
    from protoken.geometry import DMAX

    group = parser.add_argument_group("image codec")
    if bit_depth:
        group.add_argument(
            "--dmax",
            type=_positive_float,
            default=DMAX,
            help="distance cut-off in Angstrom (default 80)",
        )
    else:  # images: the convert.json beside them says, a contradicting flag is refused
        group.add_argument(
            "--dmax",
            type=_positive_float,
            default=None,
            help="the images' distance cut-off in Angstrom (default: from the convert.json "
            "beside the images, else 80; a flag that contradicts it is refused)",
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
        if text.strip().lower() == "auto":
            from protoken.inputs import shard_from_environment

            shard, how = shard_from_environment()
            print(how, file=sys.stderr)  # say what was picked
            return shard
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard(parser: argparse.ArgumentParser, what: str) -> None:
    """``--shard I/N`` (:func:`protoken.inputs.in_shard`)."""
    parser.add_argument(
        "--shard",
        type=_shard_type,
        default=None,
        metavar="I/N|auto",
        help=f"{what} only shard I of N (md5 of each input's id, its file name without "
        "extensions: inputs sharing an id share a shard), e.g. one per SLURM array task; "
        "'auto' takes I and N from the SLURM array variables (SLURM_ARRAY_TASK_ID and "
        "SLURM_ARRAY_TASK_COUNT, or _MIN/_MAX) and says what it picked",
    )


def _workers(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    default_text = "the available cores" if default is None else str(default)
    parser.add_argument(
        "--workers",
        "-j",
        type=_workers_type,
        default=default,
        help=f"{what} (default: {default_text}; at most 4 per available core)",
    )


def _progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _follow_links(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--follow-links",
        action="store_true",
        help="enter symlinked folders inside input folders (each real folder once); by "
        "default they are skipped with a warning",
    )


def _structure_output(parser: argparse.ArgumentParser) -> None:
    """``--backbone`` and ``--format``: what reconstructed structure files hold."""
    parser.add_argument(
        "--backbone", action="store_true", help="full backbone N, CA, C, O, CB (default: CB only)"
    )
    parser.add_argument("--format", choices=["pdb", "cif"], default="pdb", help="output format")


def _checkpoint(parser: argparse.ArgumentParser, default: str | None = "default") -> None:
    what = "'default'" if default else "the bundled tokenizer the token file names"
    parser.add_argument(
        "--checkpoint",
        "-c",
        default=default,
        help=f"a bundled tokenizer's name (default: {what}; see protoken pretrained) or "
        "best.pt / last.pt of a protoken train run",
    )


def _stages(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--stages",
        type=_positive_int,
        help=f"per-residue tokenizers: {what} the first K residual stages (K x 12 bits per "
        "residue with 'residue'; default: all the tokenizer has)",
    )


def _set_stages(tok, args: argparse.Namespace) -> None:
    try:
        tok.stages = args.stages
    except ValueError as exc:
        raise UsageError(f"--stages: {exc}") from None
    if getattr(args, "refine", None) is not None:
        try:
            tok.refine = args.refine
        except ValueError as exc:
            raise UsageError(f"--refine: {exc}") from None


def _refine(parser: argparse.ArgumentParser) -> None:
    from protoken.tokenizer import REFINE_STEPS

    parser.add_argument(
        "--refine",
        type=_non_negative_int,
        metavar="STEPS",
        help="per-residue tokenizers: refine the decoder's backbone for STEPS Adam steps until "
        f"the encoder gives the tokens back (default {REFINE_STEPS}; 0: one decoder pass, "
        "10-50 times faster)",
    )


def _fail(command: str, message, code: int = EXIT_USAGE) -> int:
    print(f"protoken {command}: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _check_length_limits(args: argparse.Namespace) -> None:
    lo, hi = getattr(args, "min_len", None), getattr(args, "max_len", None)
    if lo is not None and hi is not None and lo > hi:
        raise UsageError(f"--min-len {lo} is larger than --max-len {hi}")


def _out_folder(path: str) -> str:
    """``--out`` as a folder: created if needed, and checked writable, before any work.

    Raises
    ------
    UsageError
        It is an existing file, or cannot be created or written.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".protoken-write-test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {path} is not a writable folder ({exc.strerror or exc})") from None
    return path


def _out_file(path: str) -> str:
    """``--out`` as a file to write: not an existing file or folder (never overwritten); its
    folder created if needed and checked writable, before any work."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder; give a file name (e.g. tokens.npz)")
    if os.path.lexists(path):
        raise UsageError(f"--out {path} exists (not overwritten: remove it or choose another)")
    _out_folder(os.path.dirname(os.path.abspath(path)))
    return path


# --------------------------------------------------------------------------- convert


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    from protoken.shards import parse_size
    from protoken.structure import DEFAULT_MAX_BYTES

    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="structure files, folders (walked recursively), tar archives (.tar, .tar.gz ...) "
        "or Foldcomp databases (the data file DB, with DB.index and DB.dbtype beside it), "
        "read in place",
    )
    parser.add_argument("--out", "-o", required=True, help="output folder")
    parser.add_argument("--fasta-dir", help="FASTA folder (default OUT/fasta)")
    parser.add_argument(
        "--format",
        choices=("png", "shards"),
        default="png",
        help="png: one PNG per chain in OUT/bin_LO_HI/ and a FASTA in OUT/fasta/ (default); "
        "shards: tar shards in the WebDataset layout (ID.png + ID.json) under "
        "OUT/shards/BIN/, grouped by length bin, with an index OUT/shards/index.TAG.tsv",
    )

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--shard-size",
        type=size,
        default="1GB",
        help="--format shards: the most bytes per shard, e.g. 1GB (default), 500MB",
    )
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
        type=_positive_float,
        default=300.0,
        help="seconds allowed per file; the worker converting it is then killed and the file "
        "recorded as failed (default 300)",
    )
    parser.add_argument(
        "--max-bytes",
        type=_byte_size,
        default=DEFAULT_MAX_BYTES,
        help="the most bytes read from a file or inflated from its gzip stream, e.g. 512M "
        "(default 1G: 4x the largest PDB entry)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="convert again the inputs recorded as failed by earlier runs (their old rows move "
        "to manifest*.retried.tsv); by default a failed input is not tried again",
    )
    _follow_links(parser)
    _progress(parser)


def _check_inputs(inputs: list[str]) -> None:
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise UsageError(f"input not found: {', '.join(missing)}")


def _convert(args: argparse.Namespace) -> int:
    from protoken.convert import ConvertBusy, ConvertOptions, convert, manifest_path

    _check_length_limits(args)
    _check_inputs(args.inputs)
    _out_folder(args.out)
    if args.fasta_dir:
        _out_folder(args.fasta_dir)
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
        max_bytes=args.max_bytes,
        retry_failed=args.retry_failed,
        follow_links=args.follow_links,
        format=args.format,
        shard_bytes=args.shard_size,
    )
    try:
        summary = convert(
            args.inputs, opts, workers=args.workers, shard=args.shard, progress=not args.no_progress
        )
    except (FileNotFoundError, ValueError) as exc:  # an input gone, settings of convert.json
        return _fail("convert", exc)
    except ConvertBusy as exc:
        return _fail("convert", exc, EXIT_NOTHING)
    print(summary.text())
    print(f"manifest: {manifest_path(opts.out, args.shard)}")
    if summary.nothing_processed:
        what = "no structure file found" if not summary.files else "every input failed"
        return _fail("convert", f"nothing could be converted: {what}", EXIT_NOTHING)
    return EXIT_OK


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
        metavar="PATH",
        help="reference structures matched by id: a structure file, a tar archive, a Foldcomp "
        "database or a folder of any of them; writes DIR/metrics.tsv and DIR/summary.json",
    )
    _codec_options(parser, bit_depth=False)
    _max_len(parser)
    _structure_output(parser)
    parser.add_argument(
        "--no-refine", action="store_true", help="classical MDS only (no distance refinement)"
    )
    _workers(parser, 1, "processes")
    _follow_links(parser)


def _check_recorded_dmax(images, dmax: float | None) -> None:
    """Refuse a ``--dmax`` that contradicts the convert.json beside any of the images (one
    convert.json read per folder; the images are streamed, only their folders kept)."""
    from protoken.convert_settings import agreed, settings_beside

    if dmax is None:
        return
    checked: set[str] = set()
    for image in images:
        folder = os.path.dirname(os.path.abspath(image))
        if folder in checked:
            continue
        checked.add(folder)
        try:
            agreed(settings_beside(image) or {}, "dmax", dmax, f"the images of {folder}")
        except ValueError as exc:
            raise UsageError(f"--dmax: {exc}; leave --dmax out to use the recorded one") from None


def _reconstruct(args: argparse.Namespace) -> int:
    from protoken.evaluate import reconstruct_images
    from protoken.inputs import find_images
    from protoken.report import summary_line

    _check_inputs(args.inputs)
    for opt in ("fasta", "reference"):
        value = getattr(args, opt)
        if value and not os.path.exists(value):
            return _fail("reconstruct", f"--{opt}: no such file or folder: {value}")
    _out_folder(args.out)

    def images():  # streamed: the folders are walked as the workers take images
        return find_images(args.inputs, follow_links=args.follow_links)

    if next(images(), None) is None:
        return _fail("reconstruct", "no .png images found", EXIT_NOTHING)
    _check_recorded_dmax(images(), args.dmax)  # a walk of its own, before any work

    def report(row: dict) -> None:
        if "error" in row:
            print(f"{row['id']}: failed: {row['error']}", file=sys.stderr)
        elif row.get("note"):
            print(f"{row['id']}: {row['note']}", file=sys.stderr)

    rows, summary = reconstruct_images(
        images(), args.out, fasta=args.fasta, reference=args.reference, dmax=args.dmax,
        refine=not args.no_refine, backbone=args.backbone, fmt=args.format, workers=args.workers,
        max_len=args.max_len, on_row=report,
    )  # fmt: skip
    print(summary_line(summary))
    if summary["failed"]:
        print(f"failures: {os.path.join(args.out, 'failed.tsv')}", file=sys.stderr)
    if summary["failed"] == summary["images"]:
        return _fail("reconstruct", "nothing could be reconstructed", EXIT_NOTHING)
    return EXIT_OK


# --------------------------------------------------------------------------- encode / decode


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="structure files, PNG images, archives (tar, Foldcomp), folders of "
                        "either, or folders written by convert --format shards")  # fmt: skip
    _checkpoint(parser)
    parser.add_argument(
        "--out",
        "-o",
        required=True,
        help="token file to write; - (or /dev/stdout) writes --format fasta to standard "
        "output, the summary then going to standard error",
    )
    parser.add_argument(
        "--format",
        choices=["npz", "fasta", "parquet"],
        default="npz",
        help="npz: the token file protoken decode reads (both families); fasta: one record per "
        "protein, its tokens as space-separated integers, one per residue; parquet: columns "
        "id, sequence, tokens, length (pyarrow). fasta and parquet need per-residue tokens",
    )
    _stages(parser, "write")
    _structure_filters(parser)
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="proteins per forward pass"
    )
    _shard(parser, "encode")
    _follow_links(parser)
    _progress(parser)


def _encode(args: argparse.Namespace) -> int:
    from protoken.archives import find_inputs
    from protoken.token_files import STDOUT
    from protoken.tokenizer import Tokenizer, encode_to_file

    _check_length_limits(args)
    _check_inputs(args.inputs)
    to_stdout = args.out in STDOUT
    if to_stdout and args.format != "fasta":
        raise UsageError(f"--out {args.out}: only --format fasta is written to standard output")
    if not to_stdout:
        _out_file(args.out)
    tok = Tokenizer.load(args.checkpoint, batch_size=args.batch_size)
    _set_stages(tok, args)
    if args.format != "npz" and tok.family != "residue":
        raise UsageError(
            f"--format {args.format} writes one token per residue; {args.checkpoint} makes "
            "grids of tokens (use a per-residue tokenizer such as 'residue', or --format npz)"
        )
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--format parquet needs pyarrow: pip install pyarrow") from None
    try:
        done = encode_to_file(tok, find_inputs(args.inputs, args.shard, args.follow_links),
                              args.out, args.format, args.chains, args.models, args.min_len,
                              args.max_len, progress=not args.no_progress)  # fmt: skip
    except FileNotFoundError as exc:
        return _fail("encode", exc)
    except ValueError as exc:  # inputs that cannot be read at all (a malformed shard index)
        return _fail("encode", f"error: {exc}")
    if not done.written:
        return _fail("encode", "nothing encoded", EXIT_NOTHING)
    bits = done.tokens_per_residue * tok.bits_per_token
    where = "standard output" if to_stdout else args.out
    print(f"encoded {_count(done.written, 'protein')} ({_count(len(done.skipped), 'input')} "
          f"skipped) into {where}; {done.tokens_per_residue:.2f} tokens ({bits:.1f} bits) per "
          "residue on average", file=sys.stderr if to_stdout else sys.stdout)  # fmt: skip
    return EXIT_OK


def _decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "tokens", metavar="FILE", help="token file written by protoken encode (npz, FASTA, Parquet)"
    )
    _checkpoint(parser, default=None)
    parser.add_argument("--out", "-o", required=True, help="folder for ID.png and ID.pdb")
    _structure_output(parser)
    _stages(parser, "decode from")
    _refine(parser)
    _progress(parser)


def _decode(args: argparse.Namespace) -> int:
    from protoken import pretrained
    from protoken.inputs import UnsafePath
    from protoken.token_files import load_tokens
    from protoken.tokenizer import Tokenizer, decode_to_files

    _out_folder(args.out)
    tok = Tokenizer.load(args.checkpoint) if args.checkpoint else None
    try:
        tokens, meta = load_tokens(args.tokens)  # every field checked; errors name the file
    except ValueError as exc:
        raise UsageError(f"token file {exc}") from None
    except Exception as exc:  # noqa: BLE001 - anything else a malformed file causes: one line
        raise UsageError(f"cannot read token file {args.tokens}: {exc}") from None
    if tok is None:  # the bundled tokenizer the file names
        checkpoint = pretrained.name_of(meta.get("checkpoint", ""))
        if checkpoint is None:
            raise UsageError(
                f"token file {args.tokens} does not name a bundled tokenizer: give the one "
                "that made it with --checkpoint (e.g. -c residue)"
            )
        tok = Tokenizer.load(checkpoint)
    _set_stages(tok, args)
    try:
        tok.check_tokens(tokens, meta, args.tokens)
    except ValueError as exc:
        raise UsageError(f"token file {exc}") from None
    if meta.get("checkpoint") and meta["checkpoint"] != tok.checkpoint:
        print(f"protoken decode: warning: tokens were made by checkpoint {meta['checkpoint']}, "
              f"decoding with {tok.checkpoint}", file=sys.stderr)  # fmt: skip
    try:
        decode_to_files(tok, tokens, args.out, args.format, args.backbone,
                        progress=not args.no_progress)  # fmt: skip
    except UnsafePath as exc:
        raise UsageError(f"token file {args.tokens}: {exc}") from None
    print(f"decoded {_count(len(tokens), 'protein')} into {args.out} (ID.png, ID.{args.format})")
    return EXIT_OK


def _count(n: int, noun: str) -> str:
    """``1 protein``, ``2 proteins``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="structure files, PNG images, archives (tar, Foldcomp), "
                        "or folders of either")  # fmt: skip
    _checkpoint(parser)
    parser.add_argument("--out", "-o", required=True, help="report folder")
    parser.add_argument(
        "--backbone",
        action="store_true",
        help="rebuild the full backbone; report backbone RMSD and CA TM-score",
    )
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help="for PNG inputs: their true structures, matched by id (a structure file, a tar "
        "archive, a Foldcomp database or a folder of any of them); without it, or when an id "
        "is not found, a PNG is compared with its own reconstruction",
    )
    _workers(parser, None, "processes for the 3D reconstruction")
    _stages(parser, "encode and decode with")
    _refine(parser)
    _structure_filters(parser)
    _follow_links(parser)
    _progress(parser)


def _evaluate(args: argparse.Namespace) -> int:
    from protoken.archives import find_inputs
    from protoken.evaluate import evaluate
    from protoken.report import headline
    from protoken.tokenizer import Tokenizer

    _check_length_limits(args)
    _check_inputs(args.inputs)
    if args.reference and not os.path.exists(args.reference):
        return _fail("evaluate", f"--reference: no such file or folder: {args.reference}")
    _out_folder(args.out)
    tok = Tokenizer.load(args.checkpoint)
    _set_stages(tok, args)
    try:
        summary = evaluate(tok, find_inputs(args.inputs, follow_links=args.follow_links),
                           args.out, backbone=args.backbone,
                           workers=args.workers, progress=not args.no_progress,
                           chains=args.chains, models=args.models, min_len=args.min_len,
                           max_len=args.max_len, reference=args.reference,
                           log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except FileNotFoundError as exc:
        return _fail("evaluate", exc)
    except ValueError as exc:  # no protein could be evaluated
        return _fail("evaluate", exc, EXIT_NOTHING)
    print(headline(summary, args.out))
    return EXIT_OK


# --------------------------------------------------------------------------- train, demo


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from protoken.train_config import RESUMABLE

    parser.add_argument("--data", help="folder written by protoken convert (bin_*/ID.png)")
    parser.add_argument("--out", help="run folder (checkpoints, metrics, samples)")
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig values")
    parser.add_argument("--preset", help="model preset (tiny, small, reference, ...)")
    parser.add_argument(
        "--init",
        metavar="NAME|PATH",
        help="start from the weights of a bundled tokenizer (e.g. residue) or a checkpoint "
        "(fine-tuning; a new optimiser). Its family and weight shapes must match the model's; "
        "weights the model has and it lacks start from their initialisation",
    )
    parser.add_argument("--max-steps", type=int, help="optimiser steps of the whole run")
    parser.add_argument("--batch-size", type=int, help="images per batch and process")
    parser.add_argument("--lr", type=float, help="peak learning rate (after the warm-up)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute precision (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN/last.pt with RUN/config.json; only "
        f"{', '.join(sorted(RESUMABLE))} may be changed",
    )
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_config_override,
        metavar="KEY=VALUE",
        help="any TrainConfig value, e.g. --set eval_interval=100 "
        "--set 'model={\"codebook_size\": 512}' (repeatable)",
    )


def _config_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, lists)."""
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False}.get(raw, raw)
    return key.strip(), value


def train_config_from_args(args: argparse.Namespace):
    """The :class:`~protoken.train_config.TrainConfig` of ``protoken train``: RUN/config.json
    with ``--resume``, else defaults; then ``--config``, the flags and ``--set`` in that order.

    Raises
    ------
    ValueError, FileNotFoundError
        A missing ``--data`` or ``--out``, no RUN/config.json to resume, a bad value.
    """
    from protoken.train_config import TrainConfig, read_mapping

    base: dict = {}
    if args.resume:
        out = args.out or (args.config and read_mapping(args.config).get("out"))
        if not out:
            raise ValueError("--resume needs --out (the run folder)")
        path = os.path.join(out, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no {path}")
        base = {k: v for k, v in read_mapping(path).items() if k not in ("model_config", "codec")}
    if args.config:
        base.update(read_mapping(args.config))
    for key in ("data", "out", "preset", "init", "max_steps", "batch_size", "lr", "num_workers",
                "dtype"):  # fmt: skip
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.wandb:
        base["wandb"] = True
    base.update(args.overrides)
    if not base.get("data"):
        raise ValueError("--data is required (a folder written by protoken convert)")
    if not base.get("out"):
        raise ValueError("--out is required (the run folder)")
    return TrainConfig.from_dict(base)


def _train(args: argparse.Namespace) -> int:
    from protoken.train import train

    try:
        last = train(train_config_from_args(args), resume=args.resume)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _fail("train", f"error: {exc}")
    return EXIT_PREEMPTED if last.get("preempted") else EXIT_OK


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="protoken-demo",
                        help="output folder (default ./protoken-demo)")  # fmt: skip
    _checkpoint(parser)
    parser.add_argument(
        "--train",
        action="store_true",
        help="train a tiny tokenizer from scratch on the bundled structures instead of using "
        "a pretrained one (a few minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--max-steps",
        type=_positive_int,
        default=600,
        help="with --train: training steps (default 600)",
    )
    _workers(parser, None, "processes")


def _demo(args: argparse.Namespace) -> int:
    from protoken.demo import demo, demo_train

    if args.train:
        demo_train(args.out, max_steps=args.max_steps, workers=args.workers)
    else:
        demo(args.out, checkpoint=args.checkpoint, workers=args.workers)
    return 0


def _pretrained_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="print this bundled tokenizer's model card")


def _pretrained(args: argparse.Namespace) -> int:
    from protoken import pretrained

    if args.name:
        try:
            print(pretrained.card(args.name))
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
        return EXIT_OK
    aliases = pretrained.aliases()
    for name in pretrained.names():
        if name in aliases:
            print(f"{name:<10} -> {aliases[name]}")
            continue
        meta = pretrained.info(name)
        mc, res = meta["model_config"], meta.get("results", {})
        test = f"{res.get('proteins', '?')} proteins of {res.get('test_set', 'its test set')}"
        print(f"{name:<10} {mc.get('family', 'hierarchical')} family. {meta.get('summary', '')}")
        one_pass = res.get("by_stage_one_pass", [])
        for r in (res.get("by_stage") or ([res] if res else [])) + one_pass:
            rate = (f"{r['stages']} stage{'s' if r['stages'] > 1 else ''}, " if "stages" in r
                    else "")  # fmt: skip
            if "refine_steps" in r:
                rate += (f"refined {r['refine_steps']} steps, " if r["refine_steps"]
                         else "one decoder pass, ")  # fmt: skip
            by = ", ".join(f"{b['lengths']}: {b['tm_score']:.2f}" for b in r.get("by_length", []))
            bits = r["bits_per_residue_median"]
            print(f"{'':<11}median TM-score {r['tm_score_median']:.3f} ({rate}{bits:g} bits per "
                  f"residue; by length {by}) on {test}")  # fmt: skip
    print("model card: protoken pretrained NAME; use: protoken encode FILES -c NAME --out t.npz")
    return EXIT_OK


# --------------------------------------------------------------------------- the command

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (one-line help, add its arguments, run it)
COMMANDS: dict[str, Command] = {
    "convert": ("structure files -> 6D images (PNG) + FASTA, binned by length",
                _convert_arguments, _convert),
    "reconstruct": ("6D images -> 3D structures (PDB), with metrics",
                    _reconstruct_arguments, _reconstruct),
    "train": ("train a tokenizer, either family (single process or torchrun)",
              _train_arguments, _train),
    "encode": ("structures or images -> tokens (.npz, FASTA or Parquet)",
               _encode_arguments, _encode),
    "decode": ("tokens -> images -> 3D structures", _decode_arguments, _decode),
    "evaluate": ("round-trip structures through a tokenizer and report",
                 _evaluate_arguments, _evaluate),
    "demo": ("bundled structures -> pretrained tokens -> 3D, with a report",
             _demo_arguments, _demo),
    "pretrained": ("list the bundled tokenizers, or print one's model card",
                   _pretrained_arguments, _pretrained),
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


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code follows the policy of the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return EXIT_USAGE  # not reached: argparse exits on --help or a bad command
    command, rest = argv[0], argv[1:]
    args = build_parser(command).parse_args(rest)  # a usage error exits 2, in one line
    from protoken.checkpoint import CheckpointError

    previous = {}
    if command != "train":  # train handles its own signals (pre-emption, exit 75)
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                with _suppress_not_main_thread():
                    previous[sig] = signal.signal(sig, _raise_signalled)
    try:
        return int(COMMANDS[command][2](args) or 0)
    except CheckpointError as exc:  # one line naming the file, whichever command loaded it
        return _fail(command, f"error: {exc}")
    except UsageError as exc:
        return _fail(command, exc)
    except KeyboardInterrupt:
        return _fail(command, "stopped (SIGINT)", 128 + signal.SIGINT)
    except _Signalled as exc:
        return _fail(command, f"stopped ({signal.Signals(exc.signum).name})", 128 + exc.signum)
    except Exception as exc:
        if os.environ.get("PROTOKEN_DEBUG"):
            raise
        return _fail(
            command,
            f"error: {type(exc).__name__}: {exc} (PROTOKEN_DEBUG=1 shows the traceback)",
            EXIT_NOTHING,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _suppress_not_main_thread:
    """signal.signal works in the main thread only (main() called from a thread: no handlers)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is ValueError


if __name__ == "__main__":
    sys.exit(main())
