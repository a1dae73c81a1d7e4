"""Reproduce the paper's tables 2 and 3 (mean and std over seeds): one train.py process per cell and seed.

    python tools/run_tables.py --dataset synthetic --seeds 3 --out runs/tables --budget 6 -- --encoder resnet18
    python tools/run_tables.py --dataset voc --data-root ~/data/VOCdevkit --seeds 3 --out runs/voc-tables \\
        --launcher "accelerate launch --multi_gpu --num_processes 8"
    python tools/run_tables.py ... --weighting uncertainty dwa    # adds rows: b and d_s_b+copy with those weightings

Arguments after `--` go to every train.py run. Finished cells (run folder with metrics.json) are not rerun; an
interrupted one resumes from its checkpoint (--resume auto). Writes DIR/results.{md,csv,png}, DIR/results_seeds.csv
and keeps each run folder (TensorBoard, log.jsonl, metrics.json) in DIR/runs/<schedule>[_copy][_<weighting>]/seed<k>/.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.weighting import WEIGHTINGS  # noqa: E402
from schedules import SCHEDULES  # noqa: E402
from tools import sweep_stats  # noqa: E402

METRICS = ("mIoU", "fg_mIoU", "iIoU", "pixel_acc")
PAPER_KEYS = ("mIoU", "iIoU", "pixel_acc")  # what the paper reports
# flags run_tables sets itself for every cell; passing them after `--` would silently break the plan
OWN_FLAGS = ("--schedule", "--copy-weights", "--seed", "--output-dir", "--dataset", "--data-root", "--resume",
             "--joint-weighting")


@dataclass(frozen=True)
class Cell:
    """One training configuration; its seeds run in DIR/runs/<name>/seed<k>/."""

    schedule: str
    copy: bool
    weighting: str = "paper"

    @property
    def name(self) -> str:
        return self.schedule + ("_copy" if self.copy else "") + ("" if self.weighting == "paper" else f"_{self.weighting}")


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


def split_budget(num_stages: int, budget: int) -> list[int]:
    """Equal split of `budget` epochs over the stages, the remainder to the last stage (it ends the schedule)."""
    if budget < num_stages:
        raise ValueError(f"--budget {budget} is less than the {num_stages} stages of a schedule (1 epoch each at least)")
    base = budget // num_stages
    return [base] * (num_stages - 1) + [budget - base * (num_stages - 1)]


def cell_command(cell: Cell, seed: int, folder: Path, args) -> list[str]:
    """The train.py command of one cell and seed."""
    cmd = [*shlex.split(args.launcher), str(REPO / "train.py"), "--dataset", args.dataset, "--schedule", cell.schedule,
           "--seed", str(seed), "--output-dir", str(folder), "--resume", "auto"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if cell.copy:
        cmd.append("--copy-weights")
    if cell.weighting != "paper":
        cmd += ["--joint-weighting", cell.weighting]
    if args.budget:
        cmd += ["--stage-epochs", ",".join(map(str, split_budget(len(SCHEDULES[cell.schedule]), args.budget)))]
    return cmd + list(args.train_args)


def is_finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def run_cell(cmd: list[str], folder: Path, keep_checkpoints: bool, threads: int | None = None) -> bool:
    """Run one cell in a fresh process (clean Accelerate state), output to its train.log; True on success."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    folder.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - tic
    if rc != 0 or not is_finished(folder):
        tail = (folder / "train.log").read_text(errors="replace").splitlines()[-15:]
        print(f"  FAILED (exit {rc}) after {wall:.0f}s; last lines of {folder / 'train.log'}:\n    " + "\n    ".join(tail))
        return False
    (folder / "run_tables.json").write_text(json.dumps({"wall_s": wall, "command": cmd}, indent=2))
    if not keep_checkpoints:  # the tables need metrics.json; checkpoints are 100s of MB per cell
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    print(f"  done in {wall:.0f}s")
    return True


def load_results(out: Path, cells: list[Cell], seeds: list[int]) -> dict[Cell, list[dict]]:
    """metrics.json (plus the stage epochs and wall time) of every finished seed of every cell."""
    results = {}
    for cell in cells:
        results[cell] = []
        for seed in seeds:
            folder = out / "runs" / cell.name / f"seed{seed}"
            if not is_finished(folder):
                continue
            try:
                record = json.loads((folder / "metrics.json").read_text())
            except json.JSONDecodeError as err:  # e.g. a kill while train.py wrote it: report it, keep going
                print(f"warning: {folder / 'metrics.json'} is not valid JSON ({err}); left out of the tables")
                continue
            config = folder / "run_config.json"
            if config.is_file():
                record["stage_epochs"] = [s["epochs"] for s in json.loads(config.read_text())["stages"]]
            if (folder / "run_tables.json").is_file():
                record["wall_s"] = json.loads((folder / "run_tables.json").read_text())["wall_s"]
            results[cell].append({"seed": seed, **record})
    return results


def summarise(records: list[dict]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, sample std (n-1; 0 for one seed), n)} over the seeds that have the metric."""
    stats = {key: sweep_stats.summarise([r[key] for r in records if key in r]) for key in METRICS}
    return {key: stat for key, stat in stats.items() if stat is not None}


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


def machine() -> str:
    """One line naming the machine the cells ran on."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {platform.release()}, {cpu} ({os.cpu_count()} cores visible), {gpu}, torch {torch.__version__}"


def command_line(args) -> str:
    """The run_tables command that reproduces this report."""
    parts = ["python", "tools/run_tables.py", "--dataset", args.dataset, "--seeds", str(args.seeds), "--out", str(args.out)]
    parts += ["--data-root", args.data_root] if args.data_root else []
    parts += ["--first-seed", str(args.first_seed)] if args.first_seed else []
    parts += ["--budget", str(args.budget)] if args.budget else []
    parts += ["--weighting", *args.weighting] if args.weighting else []
    parts += ["--cells", *args.cells] if args.cells else []
    parts += ["--jobs", str(args.jobs)] if args.jobs > 1 else []
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
        f"Machine: {machine()}.", "",
        f"Compute: {len(walls)} runs, {sum(walls) / 60:.1f} min of wall time in all "
        f"({statistics.fmean(walls) if walls else 0:.0f} s per run on average).", "",
        "Mean ± sample standard deviation over seeds; `seeds` is how many finished. `fg_mIoU` is the mean IoU over "
        "the 20 foreground classes, `iIoU` the instance-weighted IoU (SPEC 'Metrics'); the paper's numbers are "
        "PASCAL VOC 2012 val with DINOv2 pseudo depth, for reference only.", ""])


def check_settings(out: Path, args) -> None:
    """A results folder holds one set of training settings: resuming with others would mix incomparable runs."""
    settings = {"dataset": args.dataset, "data_root": args.data_root, "budget": args.budget, "train_args": args.train_args}
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise SystemExit(f"error: {out} holds runs made with other settings ({before}); now {settings}. "
                             f"Use another --out, or delete {out / 'runs'} to start over.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def validate(args) -> None:
    """Fail before any training on flags that would break the plan."""
    clash = [a for a in args.train_args if a.split("=")[0] in OWN_FLAGS]
    if clash:
        raise SystemExit(f"error: {clash} after `--` clash with what run_tables sets per cell ({', '.join(OWN_FLAGS)})")
    if args.budget and any(a.split("=")[0] == "--stage-epochs" for a in args.train_args):
        raise SystemExit("error: --budget splits the epochs itself; drop --stage-epochs from the train args")
    if args.budget and args.budget < max(len(stages) for stages in SCHEDULES.values()):
        raise SystemExit(f"error: --budget {args.budget} is less than the stages of the longest schedule "
                         f"({max(len(stages) for stages in SCHEDULES.values())}: 1 epoch each at least)")
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("error: --seeds and --jobs must be at least 1")


BASELINE = Cell("s", False)  # table 2 row 1: every other row is compared with it, seed by seed
JOINT = Cell("b", False)  # table 2 row 2, conventional joint training: the other reference


def curves(out: Path, cells: list[Cell], seeds: list[int], metric: str = "fg_mIoU") -> dict[str, list]:
    """{cell name: mean validation curve over its seeds} from the runs' log.jsonl."""
    runs = {c.name: [sweep_stats.read_curve(out / "runs" / c.name / f"seed{s}", metric) for s in seeds] for c in cells}
    return {name: curve for name, per_seed in runs.items() if (curve := sweep_stats.mean_curve(per_seed))}


def write_report(out: Path, args, rows: list[Row], results: dict[Cell, list[dict]]) -> None:
    """results.md, results.csv, results_seeds.csv, results.png (bars) and results_curves.png in `out`."""
    title = f"# Paper tables 2 and 3 on `{args.dataset}`, {args.seeds} seed(s)\n\n"
    mean_curves = curves(out, list(results), list(range(args.first_seed, args.first_seed + args.seeds)))
    plot = ("Validation fg_mIoU against training step, mean over seeds: [results_curves.png](results_curves.png). "
            + sweep_stats.baseline_note(mean_curves.get(BASELINE.name, [])) + "\n\n")
    (out / "results.md").write_text(title + report_header(args, results) + "\n" + markdown_tables(rows, results)
                                    + "\n" + sweep_stats.differences(rows, results, BASELINE) + "\n"
                                    + sweep_stats.differences(rows, results, JOINT) + "\n" + plot)
    write_csv(rows, results, out)
    sweep_stats.bar_chart(rows, results, out / "results.png")
    sweep_stats.curve_plot(mean_curves, out / "results_curves.png",
                           f"validation fg_mIoU against step, mean over seeds ({args.dataset})")


def main(args) -> int:
    validate(args)
    out = Path(args.out)
    check_settings(out, args)
    rows = table_rows(tuple(args.weighting))
    cells = plan_cells(rows)
    unknown = set(args.cells or ()) - {c.name for c in cells}
    if unknown:
        raise SystemExit(f"error: unknown --cells {sorted(unknown)}; choose from {[c.name for c in cells]}")
    todo = [c for c in cells if c.name in args.cells] if args.cells else cells  # the report still shows every row
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    jobs = [(seed, cell) for seed in seeds for cell in todo]  # seed-major: a stopped sweep still fills every row
    # several runs at once share the cores: each gets its part as threads
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def job(i: int, seed: int, cell: Cell) -> str | None:
        folder = out / "runs" / cell.name / f"seed{seed}"
        if is_finished(folder):
            print(f"[{i + 1}/{len(jobs)}] {cell.name} seed {seed}: finished before, skipped")
            return None
        print(f"[{i + 1}/{len(jobs)}] {cell.name} seed {seed}: training in {folder}", flush=True)
        ok = run_cell(cell_command(cell, seed, folder, args), folder, args.keep_checkpoints, threads)
        return None if ok else f"{cell.name}/seed{seed}"

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [f for f in pool.map(lambda j: job(j[0], *j[1]), enumerate(jobs)) if f]
    results = load_results(out, cells, seeds)
    write_report(out, args, rows, results)
    print(f"wrote {out / 'results.md'}, results.csv, results_seeds.csv, results.png")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return 1 if failed else 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Reproduce the paper's tables 2 and 3 over seeds", add_help=True)
    p.add_argument("--dataset", required=True, help="train.py dataset preset (synthetic, voc)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--out", required=True, type=Path, help="results folder: runs/, results.md/.csv/.png")
    p.add_argument("--budget", type=int, default=None,
                   help="total epochs per schedule, split equally across stages (remainder to the last); "
                        "default: train.py's per-stage epochs")
    p.add_argument("--weighting", nargs="*", default=[], choices=[w for w in WEIGHTINGS if w != "paper"],
                   help="also run b and d_s_b+copy with these joint weightings (train.py --joint-weighting)")
    p.add_argument("--cells", nargs="*", default=None,
                   help="train only these cells (names as in runs/, e.g. s d_s_b_copy); the report shows every row")
    p.add_argument("--launcher", default=shlex.quote(sys.executable),
                   help='how to start train.py, e.g. "accelerate launch --num_processes 8" (default: this python)')
    p.add_argument("--jobs", type=int, default=1, help="train this many runs at once, the cores split between them "
                   "(OMP_NUM_THREADS = cores / jobs for each)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ (default: deleted "
                   "once the run finished; the tables need only metrics.json)")
    p.add_argument("train_args", nargs="*", help="after `--`: arguments for every train.py run")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
