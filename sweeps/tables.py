"""The paper's tables 2 and 3 over seeds (tools/run_tables.py's default sweep): the rows, their cells, the equal
epoch budget, and the report (results.md, .csv, .png)."""
import csv
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from schedules import SCHEDULES
from sweeps import plots, stats
from run_state.machine import machine_line
from sweeps.cells import Cell, split_budget

METRICS = ("mIoU", "fg_mIoU", "iIoU", "pixel_acc")
PAPER_KEYS = ("mIoU", "iIoU", "pixel_acc")  # what the paper reports


@dataclass(frozen=True)
class Row:
    """One line of a table: its leading columns, the cell it reports, the paper's numbers for it."""

    table: str
    label: tuple[str, ...]
    cell: Cell
    paper: dict = field(default_factory=dict, compare=False)


HEADERS = {"Table 2": ("model", "multi-task"), "Table 3": ("trained first", "weight copy", "then")}
TABLE2 = [
    (("single-decoder model", "no"), Cell("s", False), (0.7703, 0.48, 0.986)),
    (("multi-decoder + conventional (joint weighted) training", "yes"), Cell("b", False), (0.6412, 0.15, 0.977)),
    (("multi-decoder + proposed schedule (d → s → b, copy)", "yes"), Cell("d_s_b", True), (0.7789, 0.50, 0.997)),
]
TABLE3 = [  # the paper's row order
    (("semantic", "yes", "d → b"), Cell("s_d_b", True), (0.7297, 0.3759, 0.9840)),
    (("semantic", "yes", "b"), Cell("s_b", True), (0.7481, 0.4231, 0.9852)),
    (("semantic", "no", "d → b"), Cell("s_d_b", False), (0.7380, 0.3945, 0.9845)),
    (("semantic", "no", "b"), Cell("s_b", False), (0.7475, 0.4221, 0.9852)),
    (("depth", "yes", "s → b"), Cell("d_s_b", True), (0.7789, 0.5052, 0.9974)),
    (("depth", "yes", "b"), Cell("d_b", True), (0.0136, 0.0061, 0.9103)),
    (("depth", "no", "s → b"), Cell("d_s_b", False), (0.7737, 0.5012, 0.9870)),
    (("depth", "no", "b"), Cell("d_b", False), (0.0085, 0.0103, 0.9094)),
]


def table_rows(weightings: tuple[str, ...] = ()) -> list[Row]:
    """Both tables' rows in the paper's order; each extra weighting adds b and d_s_b+copy rows to table 2."""
    rows = [Row("Table 2", label, cell, dict(zip(PAPER_KEYS, paper))) for label, cell, paper in TABLE2]
    for w in weightings:
        if w != "paper":
            rows.append(Row("Table 2", (f"multi-decoder + joint training, {w} weighting", "yes"), Cell("b", False, w)))
            rows.append(Row("Table 2", (f"multi-decoder + proposed schedule, {w} weighting in b", "yes"),
                            Cell("d_s_b", True, w)))
    rows += [Row("Table 3", label, cell, dict(zip(PAPER_KEYS, paper))) for label, cell, paper in TABLE3]
    return rows


def plan_cells(rows: list[Row]) -> list[Cell]:
    """The cells to train, each once even when both tables report it (d_s_b with copy); the paper's weights first."""
    return sorted(dict.fromkeys(row.cell for row in rows), key=lambda c: c.weighting != "paper")


def summarise(records: list[dict]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, sample std (n-1; 0 for one seed), n)} over the seeds that have the metric."""
    found = {key: stats.summarise([r[key] for r in records if key in r]) for key in METRICS}
    return {key: stat for key, stat in found.items() if stat is not None}


def fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def markdown_tables(rows: list[Row], results: dict[Cell, list[dict]]) -> str:
    """Tables 2 and 3 laid out like the paper's, our metrics (mean ± std) then the paper's numbers."""
    metrics = [m for m in METRICS if any(m in r for recs in results.values() for r in recs)] or ["mIoU"]
    names = {"pixel_acc": "acc"}
    lines = []
    for table, lead in HEADERS.items():
        cols = [*lead, *(names.get(m, m) for m in metrics), "seeds", "epochs", "run folder", "paper mIoU / iIoU / acc"]
        lines += [f"### {table}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in (r for r in rows if r.table == table):
            records = results.get(row.cell, [])
            stats = summarise(records)
            epochs = "+".join(map(str, records[0]["stage_epochs"])) if records and "stage_epochs" in records[0] else "–"
            paper = " / ".join(f"{row.paper[k]:.4g}" for k in PAPER_KEYS) if row.paper else "–"
            cells = [*row.label, *(fmt(stats.get(m)) for m in metrics), str(len(records)), epochs,
                     f"`runs/{row.cell.name}`", paper]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[Row], results: dict[Cell, list[dict]], out: Path) -> None:
    """results.csv: one line per table row (mean, std, n per metric); results_seeds.csv: one line per run."""
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "row", "cell", "schedule", "copy_weights", "weighting", "seeds",
                    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), *(f"paper_{k}" for k in PAPER_KEYS)])
        for row in rows:
            stats = summarise(results.get(row.cell, []))
            values = [f"{stats[m][i]:.6f}" if m in stats else "" for m in METRICS for i in (0, 1)]
            w.writerow([row.table, " / ".join(row.label), row.cell.name, row.cell.schedule, row.cell.copy,
                        row.cell.weighting, len(results.get(row.cell, [])), *values,
                        *(row.paper.get(k, "") for k in PAPER_KEYS)])
    with open(out / "results_seeds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "seed", *METRICS, "stage_epochs", "wall_s"])
        for cell, records in results.items():
            for r in records:
                w.writerow([cell.name, r["seed"], *(r.get(m, "") for m in METRICS),
                            "+".join(map(str, r.get("stage_epochs", []))), f"{r.get('wall_s', 0):.1f}"])


def command_line(args) -> str:
    """The run_tables command that reproduces this report."""
    parts = ["python", "tools/run_tables.py", "--dataset", args.dataset, "--seeds", str(args.seeds), "--out", str(args.out)]
    parts += ["--data-root", args.data_root] if args.data_root else []
    parts += ["--first-seed", str(args.first_seed)] if args.first_seed else []
    parts += ["--budget", str(args.budget)] if args.budget else []
    parts += ["--weighting", *args.weighting] if args.weighting else []
    parts += ["--cells", *args.cells] if args.cells else []
    parts += ["--jobs", str(args.jobs)] if args.jobs > 1 else []
    parts += ["--labelled", *args.labelled, "--split", args.split] if args.labelled else []
    parts += ["--schedules", *args.schedules] if args.labelled and args.schedules else []
    parts += ["--schedule-steps", *args.schedule_steps] if args.schedule_steps else []
    return shlex.join(parts + (["--", *args.train_args] if args.train_args else []))


def report_header(args, results: dict[Cell, list[dict]]) -> str:
    """Command, budget mode, machine and compute of the report."""
    if args.budget:
        splits = ", ".join(f"{n}: {'+'.join(map(str, split_budget(len(SCHEDULES[n]), args.budget)))}" for n in SCHEDULES)
        mode = (f"**equal budget**: every schedule trains {args.budget} epochs in all, split equally across its stages, "
                f"the remainder to the last stage ({splits})")
    else:
        mode = ("**per-stage epochs** (train.py's preset default or `--stage-epochs` from the train args): every stage "
                "gets them, so schedules with more stages train longer")
    walls = [r["wall_s"] for recs in results.values() for r in recs if "wall_s" in r]
    return "\n".join([
        f"Command: `{command_line(args)}`", "",
        f"Epochs: {mode}.", "",
        f"Machine: {machine_line()}.", "",
        f"Compute: {len(walls)} runs, {sum(walls) / 60:.1f} min of wall time in all "
        f"({statistics.fmean(walls) if walls else 0:.0f} s per run on average).", "",
        "Mean ± sample standard deviation over seeds; `seeds` is how many finished. `fg_mIoU` is the mean IoU over "
        "the 20 foreground classes, `iIoU` the instance-weighted IoU (README, 'Evaluate'); the paper's numbers are "
        "PASCAL VOC 2012 val with DINOv2 pseudo depth, for reference only.", ""])


BASELINE = Cell("s", False)  # table 2 row 1: every other row is compared with it, seed by seed
JOINT = Cell("b", False)  # table 2 row 2, conventional joint training: the other reference


def curves(out: Path, cells: list[Cell], seeds: list[int], metric: str = "fg_mIoU") -> dict[str, list]:
    """{cell name: mean validation curve over its seeds} from the runs' log.jsonl."""
    runs = {c.name: [stats.read_curve(out / "runs" / c.name / f"seed{s}", metric) for s in seeds] for c in cells}
    return {name: curve for name, per_seed in runs.items() if (curve := stats.mean_curve(per_seed))}


def write_report(out: Path, args, rows: list[Row], results: dict[Cell, list[dict]]) -> None:
    """results.md, results.csv, results_seeds.csv, results.png (bars) and results_curves.png in `out`."""
    title = f"# Paper tables 2 and 3 on `{args.dataset}`, {args.seeds} seed(s)\n\n"
    mean_curves = curves(out, list(results), list(range(args.first_seed, args.first_seed + args.seeds)))
    plot = ("Validation fg_mIoU against training step, mean over seeds: [results_curves.png](results_curves.png). "
            + stats.baseline_note(mean_curves.get(BASELINE.name, [])) + "\n\n")
    (out / "results.md").write_text(title + report_header(args, results) + "\n" + markdown_tables(rows, results)
                                    + "\n" + stats.differences(rows, results, BASELINE) + "\n"
                                    + stats.differences(rows, results, JOINT) + "\n" + plot)
    write_csv(rows, results, out)
    plots.bar_chart(rows, results, out / "results.png")
    plots.curve_plot(mean_curves, out / "results_curves.png",
                     f"validation fg_mIoU against step, mean over seeds ({args.dataset})")
