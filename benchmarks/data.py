"""Data-path throughput: is decoding ever what limits training on this machine?

    python benchmarks/data.py [--data8 DIR --data16 DIR] [--seconds 2] [--preset tiny]

Prints, for 8- and 16-bit PNGs of bins 65-128 and 257-320 (the real structures of ../shared
converted, each bin replicated by hard links to >= 64 files so that every worker has a shard):

1. images/s in one process: ``codec.read_image`` alone, and the training stream
   (``IndexedBatches``: padded batches of 16, and standardised);
2. images/s through ``DataLoader(num_workers=2)`` and its ratio to one process;
3. the model's training throughput (forward + backward + AdamW, ``--preset``) on padded images
   of the same sizes, and the share of a training step that decoding its images costs;
4. the cost per file of indexing a folder without a manifest (one walk, ``--listing`` empty
   files), paid once per run: the stream itself never lists a folder;
5. (``--part shards``) loose PNGs vs tar shards (``convert --format shards``) read through the
   index, as training reads them: images/s in one worker and the time from nothing to the
   first batch (index, split, plan, first batch), at 10^3 and 10^5 images. The larger sets
   repeat the real images of ../shared under new ids: hard links for loose files, index rows
   pointing at the same shard bytes for shards (so both read the same bytes from disk).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from protoken.codec import read_image
from protoken.data import BatchPlan, ImageIndex, IndexedBatches

BINS = ("bin_65_128", "bin_257_320")


def shared_dir() -> Path:
    for cand in (os.environ.get("PROTOKEN_SHARED"), Path(__file__).parents[2] / "shared"):
        if cand and (Path(cand) / "data" / "structures" / "MANIFEST.tsv").is_file():
            return Path(cand)
    raise SystemExit("../shared/data/structures not found: set PROTOKEN_SHARED or pass --data8/16")


def convert_shared(out: Path, bit_depth: int) -> Path:
    """Convert the single-chain structures of ../shared (as the test fixtures do)."""
    from protoken.convert import ConvertOptions, convert

    structures = shared_dir() / "data" / "structures"
    with open(structures / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    names = [
        r["file"]
        for r in rows
        if r["n_models"] == "1"
        and r["n_chains"] == "1"
        and 40 <= int(r["n_protein_residues_first_chain"]) <= 1024
    ]
    convert(
        [str(structures / n) for n in names],
        ConvertOptions(out=str(out), bit_depth=bit_depth),
        workers=2,
        progress=False,
    )
    return out


def replicated_bin(root: Path, name: str, dest: Path, at_least: int = 64) -> Path:
    """``dest/name`` holding the files of ``root/name``, hard-linked under new names until there
    are ``at_least`` (same bytes, so decoding costs what the real files cost)."""
    src = sorted((root / name).glob("*.png"))
    if not src:
        raise SystemExit(f"no PNG in {root / name}")
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(max(at_least, len(src))):
        target = folder / f"r{i:04d}_{src[i % len(src)].name}"
        if not target.exists():
            try:
                os.link(src[i % len(src)], target)
            except OSError:
                target.write_bytes(src[i % len(src)].read_bytes())
    return folder


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (Linux /proc), seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rate(iterator, seconds: float, count=lambda x: 1, warmup: int = 2) -> tuple[float, float]:
    """Items per wall second and per CPU second (this process and the DataLoader workers) drawn
    from ``iterator`` for about ``seconds``, after ``warmup`` draws. The machine is shared: the
    CPU rate is what a worker costs, the wall rate what it gave with the load of the moment."""
    for _ in range(warmup):
        next(iterator)
    pids = [os.getpid()] + [w.pid for w in getattr(iterator, "_workers", [])]
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds(pids)
    while time.perf_counter() - t0 < seconds:
        n += count(next(iterator))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
    return n / wall, n / max(cpu, 1e-9)


def mean_length(folder: Path) -> float:
    return statistics.mean(read_image(p).shape[-1] for p in sorted(folder.glob("*.png"))[:8])


def decode_rates(folder: Path, seconds: float) -> dict[str, tuple[float, float]]:
    """Images/s of ``folder`` (a bin folder; its parent is indexed, by one walk)."""
    files = sorted(folder.glob("*.png"))
    index = ImageIndex.build(folder.parent, only_bins=[folder.name])
    plan = BatchPlan(index, index.split_rows("all", 0.0), 16, group_by_bin=True, seed=0)

    def stream(**kw):
        return IndexedBatches(plan, 64, **kw)

    def images(batch) -> int:
        return len(batch["ids"])

    return {
        "read_image": rate((read_image(p) for p in itertools.cycle(files)), seconds),
        "batch16": rate(iter(stream()), seconds, count=images),
        "batch16_reference_norm": rate(iter(stream(normalize="reference")), seconds, images),
        "loader_0w": rate(iter(DataLoader(stream(), batch_size=None)), seconds, images),
        "loader_2w": rate(
            iter(DataLoader(stream(), batch_size=None, num_workers=2)), seconds, images, warmup=4
        ),
    }


def train_rate(preset: str, side: int, batch: int, steps: int) -> float | None:
    """Training images/s of the model at ``side`` x ``side`` (None if the model is unavailable)."""
    try:
        from protoken.model import HierarchicalConfig, HierarchicalVQVAE, mask_from_lengths
    except ImportError as exc:  # the model is developed in parallel
        print(f"# model unavailable ({exc}): skipping the training comparison")
        return None
    torch.manual_seed(0)
    config = HierarchicalConfig.preset(preset)
    side = -(-side // config.downsample_factor) * config.downsample_factor
    model = HierarchicalVQVAE(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, config.in_channels, side, side) * 2 - 1
    mask = mask_from_lengths([side] * batch, side)

    def step():
        out = model(x, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def listing_cost(n_files: int, tmp: Path) -> list[tuple[str, float]]:
    """Microseconds per file to index a folder without a manifest (one walk; empty files,
    nothing is decoded), and to split and plan it: paid once when a run starts."""
    root = tmp / "listing"
    folder = root / "bin_65_128"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"AF-P{i:07d}-F1-model_v4.png").touch()
    t0 = time.perf_counter()
    index = ImageIndex.build(root)
    t1 = time.perf_counter()
    rows = index.split_rows("train", 0.05)
    t2 = time.perf_counter()
    BatchPlan(index, rows, 16, group_by_bin=True, seed=0).batch(0, 0)
    t3 = time.perf_counter()
    per_file = 1e6 / n_files
    return [("index (one walk)", (t1 - t0) * per_file), ("split", (t2 - t1) * per_file),
            ("plan of an epoch", (t3 - t2) * per_file)]  # fmt: skip


def _sized_sets(tmp: Path, sizes: tuple[int, ...]) -> dict[tuple[str, int], Path]:
    """Loose and sharded data sets of each size, from the real images of ../shared (<= 320
    residues, 8-bit), repeated under new ids ``rK_ID``."""
    from protoken.convert import ConvertOptions, convert
    from protoken.shards import INDEX_COLUMNS, index_files, read_index

    structures = shared_dir() / "data" / "structures"
    files = sorted(str(p) for p in structures.iterdir() if p.suffix in (".pdb", ".cif", ".gz"))
    base_loose, base_shards = tmp / "base_loose", tmp / "base_shards"
    kw = {"max_len": 320, "chains": "first", "models": "first"}
    convert(files, ConvertOptions(out=str(base_loose), **kw), progress=False)
    convert(files, ConvertOptions(out=str(base_shards), format="shards", **kw), progress=False)
    (index_path,) = index_files(str(base_shards))
    rows = list(read_index(index_path))
    out = {}
    for n in sizes:
        loose, shards = tmp / f"loose_{n}", tmp / f"shards_{n}"
        os.makedirs(shards / "shards")
        for entry in os.scandir(base_shards / "shards"):
            if entry.is_dir():
                os.symlink(entry.path, shards / "shards" / entry.name)
        manifest = ["source\tid\tstatus\treason\tlength\tdropped\tbin\tsequence"]
        index = ["\t".join(INDEX_COLUMNS)]
        for k in range(n):
            shard, member, offset, size, image_id, length, bin_ = rows[k % len(rows)]
            new = f"r{k // len(rows)}_{image_id}"
            (loose / bin_).mkdir(parents=True, exist_ok=True)
            os.link(base_loose / bin_ / f"{image_id}.png", loose / bin_ / f"{new}.png")
            manifest.append(f"x\t{new}\tok\t\t{length}\t0\t{bin_}\tX")
            index.append(f"{shard}\t{member}\t{offset}\t{size}\t{new}\t{length}\t{bin_}")
        (loose / "manifest.tsv").write_text("\n".join(manifest) + "\n")
        (shards / "shards" / "index.all.tsv").write_text("\n".join(index) + "\n")
        out["loose", n], out["shards", n] = loose, shards
    return out


def shards_vs_loose(tmp: Path, sizes=(1_000, 100_000), batch: int = 16) -> None:
    from protoken.data import BatchPlan, ImageIndex, IndexedBatches

    sets = _sized_sets(tmp, sizes)
    print("# first start: the index is parsed and its cache written; next starts map the cache")
    print("format\timages\tstart\tfirst_batch_s\t(index_s\tsplit_s\tplan_s)\timages_per_cpu_s")
    rates, firsts = {}, {}
    for n in sizes:
        for fmt in ("loose", "shards"):
            for start_kind in ("first", "next"):
                t0 = time.perf_counter()
                index = ImageIndex.build(sets[fmt, n])
                t1 = time.perf_counter()
                rows = index.split_rows("train", 0.05)
                t2 = time.perf_counter()
                plan = BatchPlan(index, rows, batch, group_by_bin=True, seed=0)
                t3 = time.perf_counter()
                it = iter(IndexedBatches(plan, 4))
                next(it)
                first = time.perf_counter() - t0
                firsts[fmt, n, start_kind] = first
                images, start, cpu = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - start < 3.0:
                    images += len(next(it)["ids"])
                rates[fmt, n] = images / (time.process_time() - cpu)
                print(f"{fmt}\t{n}\t{start_kind}\t{first:.3f}\t({t1 - t0:.3f}\t{t2 - t1:.3f}"
                      f"\t{t3 - t2:.3f})\t{rates[fmt, n]:.0f}", flush=True)  # fmt: skip
    for n in sizes:
        print(f"# {n} images: shards / loose images per CPU-second of one worker = "
              f"{rates['shards', n] / rates['loose', n]:.2f} (target >= 1)")  # fmt: skip
    lo, hi = min(sizes), max(sizes)
    for fmt in ("loose", "shards"):
        print(f"# {fmt}: time to first batch at {hi} / at {lo} images (next start) = "
              f"{firsts[fmt, hi, 'next'] / firsts[fmt, lo, 'next']:.2f} (target ~1)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data8", type=Path, help="a converted 8-bit folder (default: convert)")
    parser.add_argument("--data16", type=Path, help="a converted 16-bit folder")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--preset", default="tiny", help="model preset to compare with")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--listing", type=int, default=20000, help="files for the listing cost")
    parser.add_argument(
        "--part",
        choices=("all", "decode", "shards"),
        default="all",
        help="decode: sections 1-4; shards: section 5 only",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker; training below uses --threads
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")

    if args.part in ("all", "shards"):
        print("\n## loose PNGs vs tar shards, read through the index (one worker)")
        with tempfile.TemporaryDirectory(prefix="protoken-bench-shards-") as tmp:
            shards_vs_loose(Path(tmp), tuple(args.sizes))
    if args.part == "shards":
        return 0
    with tempfile.TemporaryDirectory(prefix="protoken-bench-data-") as tmp:
        tmp = Path(tmp)
        roots = {
            8: args.data8 or convert_shared(tmp / "c8", 8),
            16: args.data16 or convert_shared(tmp / "c16", 16),
        }
        print("\n## decode throughput: images per wall second / per CPU second")
        print("# one process = one DataLoader worker; loader_2w counts the CPU of main + workers")
        header = (
            "depth",
            "bin",
            "mean_L",
            "read_image",
            "batch16",
            "batch16_reference_norm",
            "loader_0w",
            "loader_2w",
            "2w/0w",
        )
        print("\t".join(header))
        per_worker: dict[tuple[int, str], float] = {}
        lengths: dict[str, float] = {}
        for depth, name in itertools.product((8, 16), BINS):
            folder = replicated_bin(roots[depth], name, tmp / f"rep{depth}")
            lengths[name] = mean_length(folder)
            r = decode_rates(folder, args.seconds)
            per_worker[depth, name] = r["batch16"][1]
            cells = [str(depth), name, f"{lengths[name]:.0f}"]
            cells += [f"{r[k][0]:.0f}/{r[k][1]:.0f}" for k in header[3:-1]]
            cells.append(f"{r['loader_2w'][0] / r['loader_0w'][0]:.2f}")
            print("\t".join(cells), flush=True)

        print(f"\n## training throughput ({args.preset}, batch {args.train_batch}) vs decoding")
        print("bin\tside\ttrain_img/s\tdecode_share_8bit\tdecode_share_16bit")
        torch.set_num_threads(args.threads)
        for name in BINS:
            side = int(name.split("_")[2])
            tr = train_rate(args.preset, side, args.train_batch, args.train_steps)
            if tr is None:
                break
            shares = [tr / per_worker[d, name] for d in (8, 16)]
            print(
                f"{name}\t{side}\t{tr:.1f}\t{shares[0]:.2%}\t{shares[1]:.2%}",
                flush=True,
            )
        print("# decode_share: CPU time to decode an image / wall time to train on it")

        print(f"\n## per-file cost of indexing a folder without a manifest ({args.listing} files)")
        print("us_per_file\tstep")
        for label, cost in listing_cost(args.listing, tmp):
            print(f"{cost:.2f}\t{label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
