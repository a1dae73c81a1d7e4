"""Data checks that decode every file: the `--check-data` report and the `--skip-bad-samples` scan.

The cheap checks (missing files, sizes, formats from the file headers) run whenever a dataset is built; these
also decode each image, label and depth map, which finds truncated images, label values outside the label set
(0..K-1 and 255; Cityscapes: unknown label ids) and constant depth maps. Any dataset a Preset opens works
(VOCSegmentation, CityscapesSegmentation: ids, split, root, check_header, load, depth_fix).
"""
import warnings
from dataclasses import dataclass

from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset

from data.voc import DataError, DataWarning, VOCSegmentation


@dataclass(frozen=True)
class Problem:
    """One finding: the split and id it belongs to ('' for the whole split) and a message naming the file."""

    split: str
    id: str
    message: str
    error: bool = True  # False: a warning, the sample still trains

    def __str__(self) -> str:
        return f"{'error' if self.error else 'warning'}: [{self.split}] {self.message}"


def sample_problems(ds: VOCSegmentation, idx: int) -> list[Problem]:
    """Everything wrong with one sample: header checks, then a full decode (stops at its first error)."""
    found, warned = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            warned += ds.check_header(idx)
            ds.load(idx)
        except DataError as exc:
            found.append(Problem(ds.split, ds.ids[idx], str(exc)))
    warned += [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    return found + [Problem(ds.split, ds.ids[idx], w, error=False) for w in warned]


class _Scan(Dataset):
    """(dataset number, index) pairs -> their problems; a Dataset so that loader workers decode in parallel."""

    def __init__(self, datasets: list[VOCSegmentation], items: list[tuple[int, int]]):
        self.datasets, self.items = datasets, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[Problem]:
        d, idx = self.items[i]
        return sample_problems(self.datasets[d], idx)


def _as_is(x):
    return x


def scan(dataset: _Scan, workers: int) -> list[Problem]:
    """All problems, `workers` loader processes decoding in parallel."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is)
    return [p for problems in loader for p in problems]


def find_problems(datasets: list[VOCSegmentation], workers: int = 0, accelerator=None) -> list[Problem]:
    """Problems of every sample of the datasets; under several processes each checks a share, all get the list."""
    items = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(items) as mine:
            local = scan(_Scan(datasets, mine), workers)
        return gather_object(local)
    return scan(_Scan(datasets, items), workers)


def drop_bad(ds: VOCSegmentation, problems: list[Problem]) -> list[Problem]:
    """Remove the samples with errors from `ds` (recorded in ds.skipped); fail if nothing is left."""
    bad = [p for p in problems if p.error and p.split == ds.split]
    bad_ids = {p.id for p in bad}
    if not bad_ids:
        return []
    if len(bad_ids) == len(ds.ids):
        fix = f". {ds.depth_fix()}" if any("pseudo depth missing" in p.message for p in bad) else ""
        raise DataError(f"{ds.root}: all {len(ds.ids)} samples of split {ds.split!r} are bad, e.g. {bad[0].message}{fix}")
    ds.ids = [i for i in ds.ids if i not in bad_ids]
    ds.skipped = [p.message for p in bad]
    return bad


def skip_bad(datasets: list[VOCSegmentation], workers: int = 0, accelerator=None) -> list[Problem]:
    """--skip-bad-samples: find every problem up front and drop the bad samples, the same on every process (batches
    stay full and processes in step, validation counts each remaining sample once)."""
    problems = find_problems(datasets, workers, accelerator)
    say = accelerator.print if accelerator is not None else print
    for p in problems:
        say(f"--skip-bad-samples: {'skipping the sample' if p.error else 'keeping the sample'}: {p}")
    for ds in datasets:
        drop_bad(ds, problems)
    return problems


def report(root, splits: dict[str, VOCSegmentation | None], problems: list[Problem], need_depth: bool) -> str:
    """The --check-data report: one line per problem, then a summary."""
    lines = [f"check-data: {root} (pseudo depth {'checked' if need_depth else 'not needed by this schedule'})"]
    lines += [f"  {p}" for p in problems]
    errors = [p for p in problems if p.error]
    for split, ds in splits.items():
        if ds is not None:
            bad = {p.id for p in errors if p.split == split}
            lines.append(f"  split {split!r}: {len(ds)} samples, {len(bad)} with errors")
        if ds is not None and any(p.split == split and "pseudo depth missing" in p.message for p in errors):
            lines.append(f"  split {split!r}: " + ds.depth_fix().replace("\n", "\n  "))
    warned = len(problems) - len(errors)
    lines.append(f"{len(errors)} error(s), {warned} warning(s)" + ("" if errors else ": the data is ready to train on"))
    return "\n".join(lines)


def check_data(root, splits: list[str], need_depth: bool, dataset, workers: int = 0) -> tuple[str, int]:
    """Run every check on the splits; returns the report and the number of errors. dataset: the Preset that opens
    the splits (preset.open)."""
    problems, datasets = [], {}
    for split in dict.fromkeys(splits):
        try:
            datasets[split] = dataset.open(root, split, None, need_depth, check=False)
        except DataError as exc:  # no split list, an empty one, not a dataset folder, a bad classes.txt
            datasets[split] = None
            problems.append(Problem(split, "", str(exc)))
    problems += find_problems([ds for ds in datasets.values() if ds is not None], workers)
    return report(root, datasets, problems, need_depth), sum(p.error for p in problems)
