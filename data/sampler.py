"""Deterministic data order and augmentation: a pure function of (seed, epoch, index).

That makes a resumed run see exactly the batches an uninterrupted one would, whatever the
number of workers or processes.
"""
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Shuffles with seed + epoch and yields keys epoch * n + index, so the dataset knows the epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        yield from (self.epoch * self.size + order).tolist()

    def __len__(self) -> int:
        return self.size


class SeededDataset(Dataset):
    """Applies the wrapped dataset's random transforms under an RNG seeded by the sampler's key."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + key)
            return self.dataset[key % len(self.dataset)]
