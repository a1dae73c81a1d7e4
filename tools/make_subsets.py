"""Write deterministic nested labelled subsets of a split (ImageSets/Segmentation/<split>_n<size>.txt), each
covering every class of the split that its size allows (data/subsets.py: how they are chosen).

    python tools/make_subsets.py --data-root datasets/VOCdevkit/VOC2012 --split train --sizes 25,100,400
    python tools/make_subsets.py --data-root datasets/VOCdevkit --split train --sizes 50,200 --seed 1 --overwrite
    python tools/make_subsets.py --data-root datasets/cityscapes --dataset cityscapes --split train --sizes 100,500
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import PRESETS  # noqa: E402
from data.subsets import SUBSET_DIR, make_subsets, parse_sizes, summary_lines  # noqa: E402


def main(args: argparse.Namespace) -> dict:
    """Write the subsets and print one line per subset; return the record written to <split>_subsets.json."""
    sizes = parse_sizes(args.sizes)
    record = make_subsets(args.data_root, args.split, sizes, seed=args.seed, dataset=args.dataset,
                          overwrite=args.overwrite, progress=not args.no_progress)
    print(f"{record['dataset']} split {args.split!r}: {record['split_size']} images, "
          f"{len(record['classes_present'])} classes present, seed {args.seed}; subsets in {SUBSET_DIR}/")
    for line in summary_lines(record):
        print(line)
    return record


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description="Write deterministic nested labelled subsets of a split",
                                     add_help=True)
    parser.add_argument("--data-root", required=True, metavar="DIR", type=Path,
                        help="the dataset folder (VOC layout or Cityscapes'); required")
    parser.add_argument("--split", default="train", help="the split to draw from (default train)")
    parser.add_argument("--sizes", required=True, metavar="N,N,...",
                        help="subset sizes, comma-separated positive integers, all different, e.g. 25,100,400")
    parser.add_argument("--seed", metavar="S", default=0, type=int,
                        help="permutation seed; same split, sizes and seed -> identical files (default 0)")
    parser.add_argument("--dataset", choices=sorted(PRESETS), default=None,
                        help="how to read the folder (default: guessed from it, as data.guess_dataset)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing subset files that list other ids (default: refuse)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileExistsError) as err:  # a clear message, not a traceback, for user mistakes
        sys.exit(f"error: {err}")
