"""Deterministic data order and augmentation: a pure function of (seed, stream, position).

A stage draws its batches from one or more streams of dataset indices (data/pools.py: the labelled images, the
depth-only ones, or all of them), each an endless run of passes, every pass a fresh permutation. A batch takes a
fixed number of samples from each stream (a `b` stage: labelled and depth-only images in a set mix). A round (an
epoch, or `--val-every` steps) is a window of consecutive batches, so a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of workers or processes.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

STREAM_STRIDE = 1 << 20  # passes of one stream before its keys could meet the next stream's


@dataclass(frozen=True)
class Stream:
    """Dataset indices drawn `per_batch` at a time; `tag` keeps its permutations and augmentations apart from other
    streams' (the same tag and indices: the same samples, augmented alike)."""

    indices: tuple[int, ...]
    per_batch: int
    tag: int

    def sample(self, seed: int, position: int, cache: dict) -> tuple[int, int]:
        """(dataset index, augmentation key) at a position of the stream."""
        n = len(self.indices)
        passes, offset = divmod(position, n)
        if (self.tag, passes) not in cache:
            generator = torch.Generator().manual_seed(seed * 7919 + self.tag * STREAM_STRIDE + passes)
            cache[(self.tag, passes)] = torch.randperm(n, generator=generator).tolist()
        slot = cache[(self.tag, passes)][offset]
        return self.indices[slot], (self.tag * STREAM_STRIDE + passes) * n + slot


class StreamSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation key) pairs, batch after batch: each batch takes `per_batch` samples from each
    stream, in stream order. Round r (set_epoch(r)) is the window of `rounds[r] * processes` batches after the earlier
    rounds' (Accelerate gives each process every processes-th batch)."""

    def __init__(self, streams: Sequence[Stream], seed: int, rounds: Sequence[int], processes: int = 1):
        if any(not s.indices or s.per_batch < 1 for s in streams):
            raise ValueError("every stream needs indices and at least one sample per batch")
        self.streams, self.seed, self.rounds, self.processes = tuple(streams), seed, tuple(rounds), processes
        self.batch_size = sum(s.per_batch for s in streams)
        self.round = 0
        self.cache: dict = {}

    def set_epoch(self, epoch: int) -> None:
        self.round = epoch
        self.cache = {}

    def __iter__(self):
        first = sum(self.rounds[: self.round]) * self.processes
        for batch in range(first, first + len(self) // self.batch_size):
            for stream in self.streams:
                for k in range(stream.per_batch):
                    yield stream.sample(self.seed, batch * stream.per_batch + k, self.cache)

    def __len__(self) -> int:
        return self.rounds[self.round] * self.processes * self.batch_size


class SeededDataset(Dataset):
    """Applies the wrapped dataset's random transforms under an RNG seeded by the sampler's augmentation key."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, key = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + key)
            return self.dataset[index]
