"""Generate the built-in synthetic VOC-format demo set (images, labels, instances, true depth).

    python tools/make_synthetic.py --out datasets/synthetic
    python tools/make_synthetic.py --out datasets/synthetic-256 --num-train 330 --num-val 346 --size 256 --overwrite
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import make_synthetic  # noqa: E402


def main(args: argparse.Namespace) -> None:
    """Generate the set (a no-op if the same set is already there) and say where it is."""
    out = make_synthetic(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                         seed=args.seed, overwrite=args.overwrite)
    print(f"synthetic set: {out} ({args.num_train} train + {args.num_val} val, {args.size} px, seed {args.seed})")


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description="Generate the synthetic VOC-format demo set", add_help=True)
    parser.add_argument("--out", required=True, metavar="DIR", type=Path, help="output folder (VOC layout); required")
    parser.add_argument("--num-train", metavar="N", default=300, type=int, help="number of training images (default 300)")
    parser.add_argument("--num-val", metavar="N", default=60, type=int, help="number of validation images (default 60)")
    parser.add_argument("--size", metavar="PX", default=128, type=int, help="image side in pixels (default 128)")
    parser.add_argument("--seed", metavar="S", default=0, type=int, help="generator seed; same seed -> identical files (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing synthetic set made with other parameters (default off)")
    return parser


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileExistsError) as err:  # a clear message, not a traceback, for user mistakes
        sys.exit(f"error: {err}")
