"""Generate the built-in synthetic VOC-format demo set (images, labels, instances, true depth).

    python tools/make_synthetic.py --out datasets/synthetic
    python tools/make_synthetic.py --out datasets/synthetic-cue --depth-cue            # objects camouflaged
    python tools/make_synthetic.py --out datasets/synthetic-bands --bands --num-extra 2000  # class = shape x depth band
    python tools/make_synthetic.py --out datasets/synthetic-256 --num-train 330 --num-val 346 --size 256 --overwrite
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import CUE_TESTBED, DEFAULTS, make_synthetic  # noqa: E402


def main(args: argparse.Namespace) -> None:
    """Generate the set (a no-op if the same set is already there) and say where it is."""
    out = make_synthetic(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                         seed=args.seed, depth_cue=args.depth_cue, overwrite=args.overwrite, num_extra=args.num_extra,
                         bands=args.bands)
    family = f"depth-cue {args.depth_cue:g}" if args.depth_cue else "bands" if args.bands else "colour"
    extra = f" + {args.num_extra} depth-only extra" if args.num_extra else ""
    print(f"synthetic set: {out} ({args.num_train} train + {args.num_val} val{extra}, {args.size} px, seed {args.seed}, "
          f"{family} family)")


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description="Generate the synthetic VOC-format demo set", add_help=True)
    parser.add_argument("--out", required=True, metavar="DIR", type=Path, help="output folder (VOC layout); required")
    parser.add_argument("--num-train", metavar="N", default=DEFAULTS["num_train"], type=int,
                        help=f"number of training images (default {DEFAULTS['num_train']})")
    parser.add_argument("--num-val", metavar="N", default=DEFAULTS["num_val"], type=int,
                        help=f"number of validation images (default {DEFAULTS['num_val']})")
    parser.add_argument("--size", metavar="PX", default=DEFAULTS["size"], type=int,
                        help=f"image side in pixels (default {DEFAULTS['size']})")
    parser.add_argument("--seed", metavar="S", default=0, type=int, help="generator seed; same seed -> identical files (default 0)")
    parser.add_argument("--depth-cue", metavar="S", nargs="?", const=CUE_TESTBED, default=0.0, type=float,
                        help="camouflage: blend each object's look this far (0..1) from its class colour towards the "
                             "ground behind it, striped as the ground would be at the object's depth, so that colour "
                             "no longer gives the object away and its depth step does (a break in the ground's "
                             f"stripes); flag alone: {CUE_TESTBED}, the testbed of docs/results.md; default 0: the "
                             "colour family, each class its own hue")
    parser.add_argument("--bands", action="store_true",
                        help="the bands family: 20 classes = 5 silhouette groups (a shape and a hue each) x 4 depth "
                             "bands; the depth map shows the band, the image only through perspective (size, height "
                             "on the ground, stripes of a fixed world period); not with --depth-cue")
    parser.add_argument("--num-extra", metavar="N", default=0, type=int,
                        help="also make N depth-only scenes (image and pseudo depth, no labels: split 'extra', "
                             "listed in ImageSets/Segmentation/extra.txt), as unlabelled photos are; train and val "
                             "stay the same whatever N (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing synthetic set made with other parameters (default off)")
    return parser


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileExistsError) as err:  # a clear message, not a traceback, for user mistakes
        sys.exit(f"error: {err}")
