"""Sweeps over seeds, one train.py process per cell and seed: the paper's tables 2 and 3, or a label-count sweep.

    python tools/run_tables.py --dataset synthetic --seeds 3 --out runs/tables --budget 6 -- --encoder resnet18
    python tools/run_tables.py --dataset voc --data-root ~/data/VOCdevkit --seeds 3 --out runs/voc-tables \\
        --launcher "accelerate launch --multi_gpu --num_processes 8"
    python tools/run_tables.py ... --weighting uncertainty dwa    # adds rows: b and d_s_b+copy with those weightings
    python tools/run_tables.py --dataset synthetic --data-root DIR --seeds 5 --out runs/labels \\
        --labelled 25 100 400 all --schedules s b d_s_b d_s_b_copy \\
        --schedule-steps s=600 b=600 d_s_b=1000,400,200 -- --depth-only rest   # few labels, many images

Arguments after `--` go to every train.py run. Finished cells (run folder with metrics.json) are not rerun; an
interrupted one resumes from its checkpoint (--resume auto). Every run shares DIR/prefixes/ (train.py
--reuse-prefixes): a stage prefix another run trained alike is reused, not trained again. Writes DIR/results.md (and
.csv, .png) and keeps each run folder in DIR/runs/[<labelled split>/]<schedule>[_copy][_<weighting>]/seed<k>/.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.weighting import WEIGHTINGS  # noqa: E402
from schedules import SCHEDULES  # noqa: E402
from sweeps import labels, tables  # noqa: E402
from sweeps.cells import (OWN_FLAGS, cell_command, check_settings, load_results, order_jobs,  # noqa: E402
                          parse_steps, run_jobs)


def validate(args) -> None:
    """Fail before any training on flags that would break the plan."""
    clash = [a for a in args.train_args if a.split("=")[0] in OWN_FLAGS]
    if clash:
        raise SystemExit(f"error: {clash} after `--` clash with what run_tables sets per cell ({', '.join(OWN_FLAGS)})")
    lengths = [a for a in args.train_args if a.split("=")[0] in ("--stage-epochs", "--stage-steps")]
    if (args.budget or args.schedule_steps) and lengths:
        raise SystemExit(f"error: --budget and --schedule-steps set the stage lengths themselves; drop {lengths} "
                         "from the train args")
    if args.budget and args.schedule_steps:
        raise SystemExit("error: --budget (epochs) or --schedule-steps (steps), not both")
    if args.budget and args.budget < max(len(stages) for stages in SCHEDULES.values()):
        raise SystemExit(f"error: --budget {args.budget} is less than the stages of the longest schedule "
                         f"({max(len(stages) for stages in SCHEDULES.values())}: 1 epoch each at least)")
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("error: --seeds and --jobs must be at least 1")
    if args.labelled and (args.cells or args.weighting):
        raise SystemExit("error: --labelled sweeps --schedules; --cells and --weighting belong to the paper's tables")


def main(args) -> int:
    validate(args)
    out = Path(args.out)
    settings = {"dataset": args.dataset, "data_root": args.data_root, "budget": args.budget, "train_args": args.train_args}
    check_settings(out, {**settings, **({"schedule_steps": args.schedule_steps} if args.schedule_steps else {})})
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    parse_steps(args.schedule_steps)  # a malformed one stops here, before anything trains
    tic = time.perf_counter()
    if args.labelled:
        splits = labels.label_splits(args)
        cells = todo = labels.plan_cells(args, splits)
    else:
        rows = tables.table_rows(tuple(args.weighting))
        cells = tables.plan_cells(rows)
        unknown = set(args.cells or ()) - {c.name for c in cells}
        if unknown:
            raise SystemExit(f"error: unknown --cells {sorted(unknown)}; choose from {[c.name for c in cells]}")
        todo = [c for c in cells if c.name in args.cells] if args.cells else cells  # the report still shows every row

    failed = run_jobs(order_jobs(todo, seeds), out, args, lambda cell, seed, folder: cell_command(cell, seed, folder, args))
    results = load_results(out, cells, seeds)
    if args.labelled:
        labels.write_report(out, args, splits, results, tables.command_line(args), time.perf_counter() - tic)
        print(f"wrote {out / 'results.md'}, results_seeds.csv, labels.png")
    else:
        tables.write_report(out, args, rows, results)
        print(f"wrote {out / 'results.md'}, results.csv, results_seeds.csv, results.png")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return 1 if failed else 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sweeps over seeds: the paper's tables 2 and 3, or a label-count sweep",
                                add_help=True)
    p.add_argument("--dataset", required=True, help="train.py dataset preset (synthetic, voc, folder, cityscapes)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--out", required=True, type=Path, help="results folder: runs/, prefixes/, results.md/.csv/.png")
    p.add_argument("--budget", type=int, default=None,
                   help="total epochs per schedule, split equally across stages (remainder to the last); "
                        "default: train.py's stage lengths (the preset's)")
    p.add_argument("--weighting", nargs="*", default=[], choices=[w for w in WEIGHTINGS if w != "paper"],
                   help="also run b and d_s_b+copy with these joint weightings (train.py --joint-weighting)")
    p.add_argument("--cells", nargs="*", default=None,
                   help="train only these cells (names as in runs/, e.g. s d_s_b_copy); the report shows every row")
    p.add_argument("--labelled", nargs="*", default=[], metavar="N|all",
                   help="a label-count sweep: train --schedules on nested labelled subsets of --split of these sizes "
                        "(tools/make_subsets.py's <split>_nN, written if missing) and on the whole split (all)")
    p.add_argument("--split", default="train", help="with --labelled: the split the subsets are drawn from")
    p.add_argument("--subset-seed", type=int, default=0, help="with --labelled: the subsets' seed (make_subsets)")
    p.add_argument("--schedules", nargs="*", default=["s", "b", "d_s_b", "d_s_b_copy"],
                   help="with --labelled: the cells at every count (a schedule, _copy: with --copy-weights)")
    p.add_argument("--schedule-steps", nargs="*", default=[], metavar="SCHEDULE=S1,S2,...",
                   help="stage lengths in steps per schedule (train.py --stage-steps), e.g. s=600 d_s_b=1000,400,200")
    p.add_argument("--launcher", default=shlex.quote(sys.executable),
                   help='how to start train.py, e.g. "accelerate launch --num_processes 8" (default: this python)')
    p.add_argument("--jobs", type=int, default=1, help="train this many runs at once, the cores split between them "
                   "(OMP_NUM_THREADS = cores / jobs for each)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ and the stored stage "
                   "prefixes (default: deleted once the sweep finished; the report needs only metrics.json)")
    p.add_argument("train_args", nargs="*", help="after `--`: arguments for every train.py run")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
