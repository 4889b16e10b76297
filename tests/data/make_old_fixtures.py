"""How the old-* files here were made: with the protoken of main 8c8b70e (before issue 13).

    git archive 8c8b70e | tar -x -C /tmp/orig
    PYTHONPATH=/tmp/orig/src python tests/data/make_old_fixtures.py tests/data

A real ``protoken train`` run (6 steps, a 4887-parameter model whose config still says
``latent_dim``) on 40 structures of ../shared, its ``last.pt`` and ``config.json``, the tokens
``protoken encode`` made of three structures with it, and the decoding of the first one. Not a
test: it needs the old code. ``tests/test_tokenizer.py`` checks that today's code reads them and
gives the same tokens and images.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import protoken
from protoken.convert import ConvertOptions, convert
from protoken.tokenizer import Tokenizer, load_tokens
from protoken.train import TrainConfig, train

out = sys.argv[1]
shared = "/work/shared/data/structures"
print("protoken from", protoken.__file__)
NANO = {
    "n_embd": 8,
    "mlp_hidden_dim": 16,
    "n_head": 1,
    "latent_dim": 8,
    "rope_dim": 8,
    "q_channels": 4,
    "codebook_dim": 4,
    "codebook_size": 16,
    "refine_channels": 4,
    "scaling_rates": [4, 2],
    "window_sizes": [0, 0],
}
tmp = tempfile.mkdtemp()
names = sorted(glob.glob(f"{shared}/cathtools__*.pdb"))[:40]
convert(names, ConvertOptions(out=f"{tmp}/img", max_len=128), workers=1, progress=False)
cfg = TrainConfig(
    data=f"{tmp}/img",
    out=f"{tmp}/run",
    preset="tiny",
    model=dict(NANO),
    batch_size=4,
    num_workers=0,
    shuffle_buffer=64,
    valid_frac=0.2,
    max_steps=6,
    warmup_steps=2,
    lr=3e-3,
    eval_interval=3,
    eval_batches=1,
    eval_structures=1,
    log_interval=3,
    ckpt_interval=3,
    seed=1,
)
train(cfg)
shutil.copy(f"{tmp}/run/last.pt", f"{out}/old-checkpoint.pt")
shutil.copy(f"{tmp}/run/config.json", f"{out}/old-run-config.json")
inputs = [
    f"{shared}/{n}" for n in ("cathtools__1c56A.pdb", "kortemme__1GUU_A.pdb", "se3diff__6E6R.pdb")
]
subprocess.run(
    [
        sys.executable,
        "-m",
        "protoken",
        "encode",
        *inputs,
        "-c",
        f"{out}/old-checkpoint.pt",
        "-o",
        f"{out}/old-tokens.npz",
        "--no-progress",
    ],
    check=True,
)
tok = Tokenizer.from_checkpoint(f"{out}/old-checkpoint.pt", device="cpu")
tokens, meta = load_tokens(f"{out}/old-tokens.npz")
decoded = np.stack([tok.decode(tokens[0])]).astype(np.float32)
np.save(f"{out}/old-decoded-0.npy", decoded[0])
print({os.path.basename(p): os.path.getsize(p) for p in glob.glob(f"{out}/old-*")})
print("params", tok.model.num_parameters(), [t.id for t in tokens], [t.length for t in tokens])
shutil.rmtree(tmp)
