"""Input pipelines over shard sets: DALI (GPU or CPU) or the webdataset + torch fallback.

    loader = create_loader("shards/synthetic", "train", preset="cifar", batch_size=64, train=True,
                           rank=rank, world=world, seed=0, device=device)
    for images, labels in loader.epoch(epoch):   # exactly loader.steps_per_epoch batches
        ...

Eval loaders pad their last batches with label -1 (``PAD_LABEL``); drop those before scoring.

A DALI loader keeps one pipeline for the whole run and reads its epochs in turn; ``state()``
says where it stands (the reader's and the random operators' state, a few kilobytes) and
``restore(state)`` continues there, so a resumed run reads exactly what an uninterrupted one
would have read, without decoding the batches it skips. Asked for another epoch than the one it
is at (or without a state), it builds a pipeline seeded from ``(seed, epoch, rank)`` and decodes
and drops the batches before ``start_step``. The torch loader plans each epoch anew from
``(seed, epoch, rank)`` and always decodes the skipped batches.
"""

from gala_scale.data.common import PAD_LABEL
from gala_scale.data.loader import LOADERS, ShardLoader, create_loader

__all__ = ["LOADERS", "PAD_LABEL", "ShardLoader", "create_loader"]
