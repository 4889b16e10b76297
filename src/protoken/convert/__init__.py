"""Batch conversion: structure files -> 6D images (PNG) + FASTA, binned by length.

Layout of the output folder ``OUT`` (the reference design's)::

    OUT/bin_40_64/ID.png, OUT/bin_65_128/ID.png, ..., OUT/bin_961_1024/ID.png
    OUT/fasta/ID.fasta            (or --fasta-dir; ``>ID length=L chains=A:120,B:98`` with
                                  --chains complex: one image per complex, chains in file order)
    OUT/manifest.tsv              (OUT/manifest.shard-I-of-N.tsv with --shard I/N)
    OUT/convert.json              the settings that change outputs

or, with ``format="shards"`` (``--format shards``), tar shards in the WebDataset layout and
their index instead of the bins and FASTA files (:mod:`protoken.shards`)::

    OUT/shards/BIN/TAG-000000.tar, OUT/shards/index.TAG.tsv

Inputs are files, folders, tar archives and Foldcomp databases (:mod:`protoken.archives`):
the main process streams archive members and sends each member's bytes to a worker, with the
source ``ARCHIVE::MEMBER`` in its manifest row, so sharding and resume work per member.

How it stays safe at scale, and against hostile files:

- Inputs are streamed (:func:`protoken.archives.find_sources`), never listed or counted up
  front. Ids are safe ids (:func:`protoken.inputs.safe_id`) and every output path is checked to
  lie inside its folder.
- Each file is converted in a worker process, never in the main one. A worker that dies (a
  parser's segfault, the OOM killer) is replaced; the file it was converting is recorded
  ``failed`` ("worker crashed: signal N") and the files queued behind it are converted again
  one by one. The per-file ``timeout`` is enforced by the main process, which kills and
  replaces a worker stuck past it, even inside C code.
- Shards: workers return the PNG bytes and the main process appends them to the open shard of
  their bin; a source's manifest rows are written once every image of it is in a committed
  shard (see :mod:`protoken.shards` for the commit protocol).
- Workers write their PNG and FASTA under temporary names (``NAME.tmp.TAG.PID``); the main
  process commits them with hard links that never replace an existing file (PNG, then FASTA:
  a FASTA is the mark of a complete output) and appends the manifest row. A killed run leaves
  at most temporary files, removed by the next run into the same OUT and shard.
- One writer per OUT and shard: a lock file (``OUT/.protoken-convert.lock``, ``flock``) makes
  a second run refuse at once; shards of one OUT run side by side.
- Inputs sharing an id (``1abc.pdb``, ``1abc.cif``) are always in the same shard (shards are
  by id) and the first in walk order wins, whatever the timing of the workers: a result is held
  back while an earlier input with the same id is still being converted. The others are
  recorded as skipped duplicates, and never deleted by ``--delete-source``.
- Resume: an input with a manifest row, or whose FASTA already exists (its id is known from its
  name outside ``--chains split``), is skipped before parsing; failed inputs are tried again
  only with ``retry_failed`` (their old rows move to ``manifest...retried.tsv``).
- ``--delete-source`` deletes an input only after all its outputs were written, read back and
  compared, and never a skipped or failed input. Existing outputs are never overwritten.
- ``OUT/convert.json`` records every setting that changes the outputs (dmax, bit depth, chains,
  models, lengths); a run with other values into the same OUT is refused.

The package, top to bottom (a module imports only those below it):

- :mod:`~protoken.convert.run`: :func:`convert`, a :class:`Conversion` (resume, commits in walk
  order, ``--delete-source``) and its :class:`Summary`;
- :mod:`~protoken.convert.pool`: worker processes, crash isolation, timeouts;
- :mod:`~protoken.convert.file`: one file or archive member -> manifest rows and outputs;
- :mod:`~protoken.convert.lock`: one writer per OUT and shard, cleanup after a killed run;
- :mod:`~protoken.convert.manifest`: the manifest's one reader and writer (training reads it);
- :mod:`~protoken.convert.options`: :class:`ConvertOptions`;
- :mod:`~protoken.convert.bins`: the length bins.

``convert.json`` is read and written by :mod:`protoken.convert_settings`, outside this
package: whoever reads the images reads it too (the codec, the shards, training).
"""

from protoken.convert.bins import bin_name
from protoken.convert.file import convert_file
from protoken.convert.lock import ConvertBusy
from protoken.convert.manifest import MANIFEST_COLUMNS, Row, manifest_path, read_manifest
from protoken.convert.options import ConvertOptions
from protoken.convert.run import Conversion, Summary, convert
from protoken.convert_settings import SETTINGS_FILE, read_settings

__all__ = [
    "MANIFEST_COLUMNS",
    "SETTINGS_FILE",
    "ConvertBusy",
    "ConvertOptions",
    "Conversion",
    "Row",
    "Summary",
    "bin_name",
    "convert",
    "convert_file",
    "manifest_path",
    "read_manifest",
    "read_settings",
]
