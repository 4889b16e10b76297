"""Training data: converted 6D images read through an index, in batches.

Typical use (what ``protoken train`` does)::

    from torch.utils.data import DataLoader
    from protoken.data import BatchPlan, ImageIndex, IndexedBatches, ignore_signals

    index = ImageIndex.build(root)                    # manifest, shard index, or one walk
    rows = index.split_rows("train", valid_frac=0.05)
    plan = BatchPlan(index, rows, batch_size=8, group_by_bin=True, seed=0)
    stream = IndexedBatches(plan, multiple=cfg.downsample_factor, rank=rank, world_size=world)
    loader = DataLoader(stream, batch_size=None, num_workers=4, worker_init_fn=ignore_signals)
    for step, batch in zip(range(max_steps), loader):
        out = model(batch["image"], batch["mask"])

Batches are dicts ``{"image": (B, 3, H, H), "mask": (B, H, H) bool, "lengths", "ids",
"paths", "epoch", "position"}``; ``stream.position_after(n)`` is where to resume.

:mod:`protoken.data.index` finds the images and splits them; :mod:`protoken.data.batches`
plans, reads, decodes and pads them.
"""

from protoken.convert.bins import bin_range
from protoken.data.batches import (
    BatchPlan,
    IndexedBatches,
    Normalization,
    batch_sizes_for_budget,
    collate_with_padding,
    decode_image,
    ignore_signals,
)
from protoken.data.index import ImageIndex, in_valid_split, read_id_list

__all__ = [
    "BatchPlan",
    "ImageIndex",
    "IndexedBatches",
    "Normalization",
    "batch_sizes_for_budget",
    "bin_range",
    "collate_with_padding",
    "decode_image",
    "ignore_signals",
    "in_valid_split",
    "read_id_list",
]
