"""A data stream that is a pure function of (seed, epoch, index).

Each epoch's order is a permutation drawn from a generator seeded with (seed, epoch); every example is made
under python/numpy/torch RNGs seeded with (seed, epoch, index). So random crops and flips do not depend on the
number of dataloader workers or processes, and a resumed run replays the stream from the exact micro-batch
where its checkpoint was taken, without restoring any sampler state.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset


def derived_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_rng(seed: int | None = None, cuda: bool = False) -> Iterator[None]:
    """Run a block with python, numpy and torch RNGs seeded with `seed` (or left as they are when None) and
    restore all of them afterwards, so the block neither depends on nor disturbs the surrounding streams."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = [torch.cuda.current_device()] if cuda and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            # Not torch.manual_seed: with CUDA not yet initialised it queues a lazy seeding of every GPU and
            # records a stack trace for it, a millisecond per call, and this runs once per training example.
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)  # the current device, the one fork_rng restores
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """`ds[(index, seed)]` is `dataset[index]` computed under RNGs seeded with `seed` (see `seeded_rng`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index]


class EpochBatchSampler:
    """This process's micro-batches of one epoch, as lists of (index, item seed) for `SeededDataset`.

    The epoch's order is padded by wrapping around so that every global batch is full, and global batch b is
    split between W processes: process r takes positions [b*W*B + r*B, b*W*B + (r+1)*B).
    `set_epoch(e, skip=k)` makes the next iteration start at micro-batch k of epoch e."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("the training dataset is empty: check the data folder or dataset name")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.batches_per_epoch = math.ceil(num_examples / (batch_size * num_replicas))
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip < self.batches_per_epoch:
            raise ValueError(f"skip must be in [0, {self.batches_per_epoch}), got {skip}")
        self.epoch, self.skip = epoch, skip

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            order = torch.randperm(self.num_examples, generator=g).tolist()
        else:
            order = list(range(self.num_examples))
        total = self.batches_per_epoch * self.batch_size * self.num_replicas
        return (order * math.ceil(total / len(order)))[:total]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        global_batch = self.batch_size * self.num_replicas
        for b in range(self.skip, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            yield [(i, derived_seed(self.seed, self.epoch, i)) for i in order[start:start + self.batch_size]]
