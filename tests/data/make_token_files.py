"""How tokens-v2-*.npz here were made: with protoken at the commit that added them (token
format ``protoken-tokens/2``, whose meta says ``layout``: ``grid`` or ``residue``).

    PYTHONPATH=src python tests/data/make_token_files.py tests/data

The bundled tokenizers ``default`` (hierarchical) and ``residue`` encode three bundled
structures of 68-147 residues. Not a test: ``tests/test_tokenizer.py`` checks that today's
code reads these files and that the bundled tokenizers still give the same tokens.
"""

import os
import sys
from importlib import resources

from protoken.token_files import save_tokens
from protoken.tokenizer import Tokenizer

NAMES = ["kortemme__1CTF_A.pdb.gz", "cathtools__1avyA00.pdb.gz", "foldseek__d1itha_.pdb.gz"]

out = sys.argv[1]
folder = resources.files("protoken").joinpath("resources/structures")
sources = [str(folder.joinpath(n)) for n in NAMES]
for name in ("default", "residue"):
    tok = Tokenizer.load(name, device="cpu")
    path = os.path.join(out, f"tokens-v2-{name}.npz")
    save_tokens(path, tok.encode_many(sources), tok.meta())
    print(path)
