"""A label-count sweep (tools/run_tables.py --labelled): the same schedules trained on nested labelled subsets of one
split (data/subsets.py), every other image of the dataset depth-only when the train args say `--depth-only rest`,
stage lengths in steps. The report: fg_mIoU against the number of labelled images per schedule (mean and 95% CI over
seeds), each schedule's paired difference from `s` and from `b` at every count, and whether each run's validation
curve had flattened by its end."""
import csv
import math
from pathlib import Path

from data import PRESETS
from data.subsets import make_subsets, subset_name
from schedules import SCHEDULES
from sweeps import plots, stats
from run_state.machine import machine_line
from sweeps.cells import PREFIXES, Cell, parse_steps, run_folder

ALL = "all"  # --labelled all: the whole split
METRICS = ("fg_mIoU", "mIoU")
FLAT_LAST, FLAT_TOL = 3, 0.02  # a run's curve is flat when its last 3 validations lie within 0.02


def parse_cell(name: str, labelled: str) -> Cell:
    """`d_s_b_copy` -> Cell("d_s_b", copy=True) on a labelled split."""
    schedule = name.removesuffix("_copy")
    if schedule not in SCHEDULES:
        raise SystemExit(f"error: --schedules {name}: not a schedule ({', '.join(SCHEDULES)}, each may end in _copy)")
    return Cell(schedule, name.endswith("_copy"), labelled=labelled)


def label_splits(args) -> dict[str, int]:
    """{labelled split: its number of images} for --labelled: N is the nested subset <split>_nN (written, or checked
    to be as written, by data.subsets.make_subsets with --subset-seed), `all` the split itself."""
    dataset = args.dataset
    root = args.data_root or PRESETS[dataset].data_root
    if dataset == "synthetic":  # made on first use, as train.py would
        from data import prepare_root

        root = prepare_root(dataset, root)
    sizes = sorted({int(x) for x in args.labelled if x != ALL})
    splits = {}
    if sizes:
        record = make_subsets(root, args.split, sizes, seed=args.subset_seed, dataset=dataset, progress=False)
        splits = {subset_name(args.split, size): record["subsets"][subset_name(args.split, size)]["count"]
                  for size in sizes}
    if ALL in args.labelled:
        preset = PRESETS[dataset]
        splits[args.split] = len(preset.for_root(root).open(root, args.split, check=False))
    return dict(sorted(splits.items(), key=lambda kv: kv[1]))


def plan_cells(args, splits: dict[str, int]) -> list[Cell]:
    return [parse_cell(name, split) for split in splits for name in args.schedules]


def curve_check(out: Path, cell: Cell, seeds: list[int]) -> tuple[list[float], bool] | None:
    """The last validations of the mean curve over seeds (fg_mIoU) and whether they are within FLAT_TOL."""
    curve = stats.mean_curve([stats.read_curve(run_folder(out, cell, s)) for s in seeds])
    tail = [v for _, v in curve[-FLAT_LAST:]]
    return (tail, stats.is_flat(curve, FLAT_LAST, FLAT_TOL)) if tail else None


def interval(values: list[float]) -> tuple[float, float, float, int] | None:
    """(mean, lo, hi, n): the mean with its 95% t interval (lo = hi = mean for one value)."""
    summary = stats.summarise(values)
    if summary is None:
        return None
    mean, sd, n = summary
    half = stats.t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return mean, mean - half, mean + half, n


def by_seed(records: list[dict], metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in records if metric in r}


def difference_table(cells: dict[tuple[str, str], Cell], names: list[str], splits: dict[str, int], results: dict,
                     baseline: str, metric: str) -> list[str]:
    """Markdown rows: each schedule's paired difference from the baseline at every labelled count."""
    lines = ["| schedule | " + " | ".join(f"{n} labelled" for n in splits.values()) + " |",
             "|---|" + "---|" * len(splits)]
    for name in names:
        if name == baseline:
            continue
        row = []
        for split in splits:
            diff = stats.paired_difference(by_seed(results[cells[name, split]], metric),
                                           by_seed(results[cells[baseline, split]], metric))
            row.append("–" if diff is None else
                       f"{diff['mean']:+.4f} [{diff['lo']:+.4f}, {diff['hi']:+.4f}] {stats.verdict(diff)}")
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    return lines


def write_report(out: Path, args, splits: dict[str, int], results: dict, command: str, elapsed: float | None) -> None:
    """results.md, results_seeds.csv and labels.png (fg_mIoU against labelled count, 95% CI bands) in `out`."""
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    cells = {(c.name, c.labelled): c for c in results}
    names = list(args.schedules)
    steps = parse_steps(args.schedule_steps)
    walls = [r["wall_s"] for recs in results.values() for r in recs if "wall_s" in r]
    cpus = [r["cpu_s"] for recs in results.values() for r in recs if "cpu_s" in r]
    reused = [r for recs in results.values() for r in recs if "reused_prefix" in r]
    lines = [f"# Few labels, many images: `{args.dataset}` ({args.data_root}), {args.seeds} seed(s)", "",
             f"Command: `{command}`", "",
             "Stage lengths in steps: " + ("; ".join(f"`{n}` {v.replace(',', '+')}" for n, v in steps.items()) or
                                           "train.py's (epochs)") + ".", "",
             f"Machine: {machine_line()}.", "",
             f"Compute: {len(walls)} runs, {sum(walls) / 60:.1f} min of run time in all, {args.jobs} at a time"
             + (f"; their CPU time {sum(cpus) / 3600:.2f} h ({len(cpus)} runs measured: on an idle machine with "
                f"{args.jobs} jobs of one thread, about {sum(cpus) / 3600 / args.jobs:.2f} h of wall time)" if cpus else "")
             + (f"; this invocation took {elapsed / 60:.1f} min" if elapsed else "") + f". {len(reused)} runs started "
             f"from a stage prefix another run had trained and stored (`{PREFIXES}/`, train.py --reuse-prefixes).", "",
             "## fg_mIoU against the number of labelled images", "",
             "Mean over seeds with its 95% confidence interval (Student's t). Held-out val split, every class present.",
             "", "![fg_mIoU against labelled images](labels.png)", "",
             "| schedule | " + " | ".join(f"{n} labelled" for n in splits.values()) + " |", "|---|" + "---|" * len(splits)]
    bands = {}
    for name in names:
        row, band = [], []
        for split, count in splits.items():
            ci = interval([r["fg_mIoU"] for r in results[cells[name, split]] if "fg_mIoU" in r])
            row.append("–" if ci is None else f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}] ({ci[3]})")
            if ci is not None:
                band.append((count, ci[0], ci[1], ci[2]))
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
        bands[name] = band
    for baseline in ("s", "b"):
        if baseline in names:
            lines += ["", f"## Paired differences against `{baseline}` (fg_mIoU), per labelled count", "",
                      f"Mean of (schedule − `{baseline}`) over the seeds both finished, 95% CI; *better* / *worse* when "
                      "the interval excludes 0.", "", *difference_table(cells, names, splits, results, baseline, "fg_mIoU")]
    lines += ["", "## Did the curves flatten?", "",
              f"Each cell's mean validation fg_mIoU at its last {FLAT_LAST} validations (the last stage's rounds); flat "
              f"when they lie within {FLAT_TOL}.", "",
              "| schedule | " + " | ".join(f"{n} labelled" for n in splits.values()) + " |", "|---|" + "---|" * len(splits)]
    for name in names:
        row = []
        for split in splits:
            check = curve_check(out, cells[name, split], seeds)
            row.append("–" if check is None else
                       " → ".join(f"{v:.3f}" for v in check[0]) + (" flat" if check[1] else " **still moving**"))
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with open(out / "results_seeds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["labelled_split", "labelled", "cell", "seed", *METRICS, "stage_steps", "wall_s", "reused_prefix"])
        for cell, records in results.items():
            for r in records:
                w.writerow([cell.labelled, splits[cell.labelled], cell.name, r["seed"], *(r.get(m, "") for m in METRICS),
                            "+".join(map(str, r.get("stage_steps", []))), f"{r.get('wall_s', 0):.1f}",
                            r.get("reused_prefix", {}).get("made_by", "")])
    plots.label_plot(bands, out / "labels.png",
                     f"fg_mIoU against labelled images, mean and 95% CI over seeds ({args.dataset})")

