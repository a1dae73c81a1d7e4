"""The runs of a sweep (tools/run_tables.py): one train.py process per cell and seed, resumable, two at a time if
asked, every run sharing one store of finished stage prefixes (train.py --reuse-prefixes), so a stage that several
cells train alike (the depth stage of d_s_b with and without --copy-weights, at every labelled count) trains once.

Seeds pair the runs: seed k of every cell starts from the same weights and sees the same batches (train.py is
deterministic in its seed), so cells are compared seed by seed (sweeps/stats.py).
"""
import json
import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from schedules import SCHEDULES

REPO = Path(__file__).resolve().parents[1]
PREFIXES = "prefixes"  # the sweep's store of finished stage prefixes, inside its folder
# flags the sweep sets itself for every run; passing them after `--` would silently break the plan
OWN_FLAGS = ("--schedule", "--copy-weights", "--seed", "--output-dir", "--dataset", "--data-root", "--resume",
             "--joint-weighting", "--train-split", "--reuse-prefixes")


@dataclass(frozen=True)
class Cell:
    """One training configuration; its seeds run in DIR/runs/[<labelled>/]<name>/seed<k>/."""

    schedule: str
    copy: bool
    weighting: str = "paper"
    labelled: str | None = None  # the labelled split (--train-split) of a label-count sweep

    @property
    def name(self) -> str:
        return self.schedule + ("_copy" if self.copy else "") + ("" if self.weighting == "paper" else f"_{self.weighting}")

    @property
    def folder(self) -> str:
        return f"{self.labelled}/{self.name}" if self.labelled else self.name


def run_folder(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / cell.folder / f"seed{seed}"


def split_budget(num_stages: int, budget: int) -> list[int]:
    """Equal split of `budget` epochs over the stages, the remainder to the last stage (it ends the schedule)."""
    if budget < num_stages:
        raise ValueError(f"--budget {budget} is less than the {num_stages} stages of a schedule (1 epoch each at least)")
    base = budget // num_stages
    return [base] * (num_stages - 1) + [budget - base * (num_stages - 1)]


def parse_steps(items: list[str]) -> dict[str, str]:
    """`s=600 d_s_b=1000,400,200` -> {"s": "600", "d_s_b": "1000,400,200"}, checked against each schedule's stages."""
    steps = {}
    for item in items:
        name, _, value = item.partition("=")
        counts = value.split(",")
        if name not in SCHEDULES or not all(c.isdigit() and int(c) > 0 for c in counts) or \
                len(counts) not in (1, len(SCHEDULES[name])):
            raise SystemExit(f"error: --schedule-steps {item}: expected SCHEDULE=S or SCHEDULE=S1,S2,... (one per stage, "
                             f"positive integers)")
        steps[name] = value
    return steps


def stage_lengths(cell: Cell, args) -> list[str]:
    """The cell's stage lengths: its share of --budget epochs, or its schedule's --schedule-steps, or none (train.py's
    own)."""
    if args.budget:
        return ["--stage-epochs", ",".join(map(str, split_budget(len(SCHEDULES[cell.schedule]), args.budget)))]
    steps = parse_steps(args.schedule_steps)
    return ["--stage-steps", steps[cell.schedule]] if cell.schedule in steps else []


def cell_command(cell: Cell, seed: int, folder: Path, args) -> list[str]:
    """The train.py command of one cell and seed."""
    cmd = [*shlex.split(args.launcher), str(REPO / "train.py"), "--dataset", args.dataset, "--schedule", cell.schedule,
           "--seed", str(seed), "--output-dir", str(folder), "--resume", "auto",
           "--reuse-prefixes", str(Path(args.out) / PREFIXES)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if cell.copy:
        cmd.append("--copy-weights")
    if cell.weighting != "paper":
        cmd += ["--joint-weighting", cell.weighting]
    if cell.labelled:
        cmd += ["--train-split", cell.labelled]
    return cmd + stage_lengths(cell, args) + list(args.train_args)


def is_finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def run_cell(cmd: list[str], folder: Path, keep_checkpoints: bool, threads: int | None = None) -> bool:
    """Run one cell in a fresh process (clean Accelerate state), output to its train.log; True on success."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    cmd = [*cmd, "--threads", str(threads)] if threads else cmd  # train.py's own count on the CPU (not the env's)
    folder.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own CPU time: what it costs whatever else runs
        rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - tic
    cpu = usage.ru_utime + usage.ru_stime
    if rc != 0 or not is_finished(folder):
        tail = (folder / "train.log").read_text(errors="replace").splitlines()[-15:]
        print(f"  FAILED (exit {rc}) after {wall:.0f}s; last lines of {folder / 'train.log'}:\n    " + "\n    ".join(tail)
              + "\n", end="", flush=True)
        return False
    (folder / "run_tables.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "command": cmd}, indent=2))
    if not keep_checkpoints:  # the tables need metrics.json; checkpoints are 100s of MB per cell
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    print(f"  {folder}: done in {wall:.0f}s ({cpu:.0f}s of CPU time)\n", end="", flush=True)
    return True


def order_jobs(cells: list[Cell], seeds: list[int]) -> list[tuple[int, Cell]]:
    """Seed by seed (a stopped sweep still fills every row); within a seed, the first cell of each group that starts
    with the same stage goes first and the others of the group last, so the prefix they share is stored before they
    start (a run needing a prefix another run is training waits for it)."""
    jobs = []
    for seed in seeds:
        leaders, single, followers, seen = [], [], [], set()
        for cell in cells:
            stages = SCHEDULES[cell.schedule]
            if len(stages) == 1:
                single.append(cell)
            elif stages[0].name in seen:
                followers.append(cell)
            else:
                seen.add(stages[0].name)
                leaders.append(cell)
        jobs += [(seed, c) for c in leaders + single + followers]
    return jobs


def run_jobs(jobs: list[tuple[int, Cell]], out: Path, args, command) -> list[str]:
    """Train every (seed, cell) not finished yet, args.jobs at a time with the cores split between them; `command`
    gives a job's train.py command. Returns the failed ones."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def job(i: int, seed: int, cell: Cell) -> str | None:
        folder = run_folder(out, cell, seed)
        if is_finished(folder):
            print(f"[{i + 1}/{len(jobs)}] {cell.folder} seed {seed}: finished before, skipped\n", end="", flush=True)
            return None
        # one write per line: jobs print from several threads
        print(f"[{i + 1}/{len(jobs)}] {cell.folder} seed {seed}: training in {folder}\n", end="", flush=True)
        ok = run_cell(command(cell, seed, folder), folder, args.keep_checkpoints, threads)
        return None if ok else f"{cell.folder}/seed{seed}"

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [f for f in pool.map(lambda j: job(j[0], *j[1]), enumerate(jobs)) if f]
    if not failed and not args.keep_checkpoints:
        shutil.rmtree(out / PREFIXES, ignore_errors=True)  # checkpoints too: every run that could reuse one finished
    return failed


def load_results(out: Path, cells: list[Cell], seeds: list[int]) -> dict[Cell, list[dict]]:
    """metrics.json (plus the stage lengths, wall time and reused prefix) of every finished seed of every cell."""
    results = {}
    for cell in cells:
        results[cell] = []
        for seed in seeds:
            folder = run_folder(out, cell, seed)
            if not is_finished(folder):
                continue
            try:
                record = json.loads((folder / "metrics.json").read_text())
            except json.JSONDecodeError as err:  # e.g. a kill while train.py wrote it: report it, keep going
                print(f"warning: {folder / 'metrics.json'} is not valid JSON ({err}); left out of the tables")
                continue
            config = folder / "run_config.json"
            if config.is_file():
                run = json.loads(config.read_text())
                record["stage_epochs"] = [s["epochs"] for s in run["stages"]]
                record["stage_steps"] = [s.get("steps") for s in run["stages"]]
                if "reused_prefix" in run:
                    record["reused_prefix"] = run["reused_prefix"]
            if (folder / "run_tables.json").is_file():
                timing = json.loads((folder / "run_tables.json").read_text())
                record.update({k: timing[k] for k in ("wall_s", "cpu_s") if k in timing})
            results[cell].append({"seed": seed, "folder": str(folder), **record})
    return results


def check_settings(out: Path, settings: dict) -> None:
    """A results folder holds one set of training settings: resuming with others would mix incomparable runs."""
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise SystemExit(f"error: {out} holds runs made with other settings ({before}); now {settings}. "
                             f"Use another --out, or delete {out / 'runs'} to start over.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
