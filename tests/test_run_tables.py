"""tools/run_tables.py (sweeps/): the plan equals the paper's tables, budgets, aggregation, layout, resumability."""
import csv
import json
import subprocess
from itertools import product

import pytest

from schedules import SCHEDULES
from sweeps import cells as sc
from sweeps import tables
from tools import run_tables as rt

TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4",
        "--max-steps-per-epoch", "1", "--workers", "0"]
FIRST = {"s": "semantic", "d": "depth"}


def parse(*argv):
    return rt.get_args_parser().parse_args(list(argv))


def test_plan_is_the_papers_two_tables():
    rows = tables.table_rows()
    t2 = [r.cell for r in rows if r.table == "Table 2"]
    t3 = [r for r in rows if r.table == "Table 3"]
    assert t2 == [sc.Cell("s", False), sc.Cell("b", False), sc.Cell("d_s_b", True)]
    # table 3: first decoder x weight copy x what follows, in the paper's row order
    assert [(r.cell.schedule, r.cell.copy) for r in t3] == [
        ("s_d_b", True), ("s_b", True), ("s_d_b", False), ("s_b", False),
        ("d_s_b", True), ("d_b", True), ("d_s_b", False), ("d_b", False)]
    assert {(r.cell.schedule, r.cell.copy) for r in t3} == set(product(["s_d_b", "s_b", "d_s_b", "d_b"], [True, False]))
    for r in t3:  # the leading columns say what the schedule does
        first, *then = r.cell.schedule.split("_")
        assert r.label == (FIRST[first], "yes" if r.cell.copy else "no", " → ".join(then))
    cells = tables.plan_cells(rows)
    assert len(cells) == 10 and cells.count(sc.Cell("d_s_b", True)) == 1  # shared by both tables: runs once
    assert all(c.weighting == "paper" for c in cells)
    best = next(r for r in t3 if r.cell == sc.Cell("d_s_b", True))
    assert best.paper == {"mIoU": 0.7789, "iIoU": 0.5052, "pixel_acc": 0.9974}


def test_weightings_add_rows_to_table_2():
    cells = tables.plan_cells(tables.table_rows(("uncertainty", "dwa")))
    assert len(cells) == 14
    assert [c.name for c in cells[-4:]] == ["b_uncertainty", "d_s_b_copy_uncertainty", "b_dwa", "d_s_b_copy_dwa"]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_budget_split_sums_to_the_budget(schedule, tmp_path):
    n = len(SCHEDULES[schedule])
    for budget in range(n, 25):
        split = sc.split_budget(n, budget)
        assert sum(split) == budget and len(split) == n and min(split) >= 1
        assert len(set(split[:-1])) <= 1 and split[-1] - split[0] == budget % n  # equal, remainder to the last
        args = parse("--dataset", "synthetic", "--out", str(tmp_path), "--budget", str(budget))
        cmd = sc.cell_command(sc.Cell(schedule, False), 0, tmp_path, args)
        assert cmd[cmd.index("--stage-epochs") + 1] == ",".join(map(str, split))
    assert sc.split_budget(3, 8) == [2, 2, 4] and sc.split_budget(2, 7) == [3, 4]
    with pytest.raises(ValueError, match="less than the"):
        sc.split_budget(3, 2)


def fake_run(out, name, seed, **metrics):
    folder = out / "runs" / name / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "run_config.json").write_text(json.dumps({"stages": [{"epochs": 2}, {"epochs": 4}]}))


def test_aggregation_by_hand(tmp_path):
    fake_run(tmp_path, "s", 0, mIoU=0.5, fg_mIoU=0.4, pixel_acc=0.9, iIoU=0.2)
    fake_run(tmp_path, "s", 1, mIoU=0.6, fg_mIoU=0.4, pixel_acc=0.8, iIoU=0.4)
    fake_run(tmp_path, "s", 2, mIoU=0.7, fg_mIoU=0.4, pixel_acc=0.7)  # no instances: iIoU over two seeds
    fake_run(tmp_path, "b", 0, mIoU=0.3, fg_mIoU=0.1, pixel_acc=0.5)
    cells = [sc.Cell("s", False), sc.Cell("b", False), sc.Cell("d_s_b", True)]
    results = sc.load_results(tmp_path, cells, [0, 1, 2])
    stats = tables.summarise(results[sc.Cell("s", False)])
    assert stats["mIoU"] == pytest.approx((0.6, 0.1, 3))  # sample std: sqrt((0.01 + 0 + 0.01) / 2)
    assert stats["pixel_acc"] == pytest.approx((0.8, 0.1, 3))
    assert stats["fg_mIoU"] == pytest.approx((0.4, 0.0, 3))
    assert stats["iIoU"] == pytest.approx((0.3, 0.02**0.5, 2))
    assert tables.summarise(results[sc.Cell("b", False)])["mIoU"] == (0.3, 0.0, 1)
    assert results[sc.Cell("d_s_b", True)] == []
    rows = [r for r in tables.table_rows() if r.table == "Table 2"]
    tables.write_csv(rows, results, tmp_path)
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["cell"] for r in table] == ["s", "b", "d_s_b_copy"]
    assert float(table[0]["mIoU_mean"]) == pytest.approx(0.6) and float(table[0]["mIoU_std"]) == pytest.approx(0.1)
    assert table[2]["seeds"] == "0" and table[2]["mIoU_mean"] == ""
    assert len(list(csv.DictReader(open(tmp_path / "results_seeds.csv")))) == 4


def test_markdown_layout(tmp_path):
    for seed, miou in enumerate([0.5, 0.7]):
        fake_run(tmp_path, "d_s_b_copy", seed, mIoU=miou, fg_mIoU=0.25, pixel_acc=0.75)
    fake_run(tmp_path, "s", 0, mIoU=0.125, fg_mIoU=0.0625, pixel_acc=0.5)
    rows = tables.table_rows()
    text = tables.markdown_tables(rows, sc.load_results(tmp_path, tables.plan_cells(rows), [0, 1]))
    lines = text.splitlines()
    t2, t3 = lines.index("### Table 2"), lines.index("### Table 3")
    assert lines[t2 + 2] == "| model | multi-task | mIoU | fg_mIoU | acc | seeds | epochs | run folder | paper mIoU / iIoU / acc |"
    assert lines[t3 + 2] == ("| trained first | weight copy | then | mIoU | fg_mIoU | acc | seeds | epochs | run folder "
                             "| paper mIoU / iIoU / acc |")  # no iIoU column: no run had instances
    body2 = [ln for ln in lines[t2 + 4:t3] if ln.startswith("|")]
    body3 = [ln for ln in lines[t3 + 4:] if ln.startswith("|")]
    assert len(body2) == 3 and len(body3) == 8
    assert body2[0] == "| single-decoder model | no | 0.1250 | 0.0625 | 0.5000 | 1 | 2+4 | `runs/s` | 0.7703 / 0.48 / 0.986 |"
    assert body2[1].startswith("| multi-decoder + conventional (joint weighted) training | yes | – | – | – | 0 | – |")
    std = (0.02 ** 0.5)  # two seeds, 0.5 and 0.7
    assert body3[4] == (f"| depth | yes | s → b | 0.6000 ± {std:.4f} | 0.2500 ± 0.0000 | 0.7500 ± 0.0000 | 2 | 2+4 "
                        "| `runs/d_s_b_copy` | 0.7789 / 0.5052 / 0.9974 |")
    assert all(ln.count("|") == body3[0].count("|") for ln in body3)


def test_bad_flags_fail_before_training(tmp_path):
    with pytest.raises(SystemExit, match="clash"):
        rt.main(parse("--dataset", "synthetic", "--out", str(tmp_path), "--", "--seed", "3"))
    with pytest.raises(SystemExit, match="stage-epochs"):
        rt.main(parse("--dataset", "synthetic", "--out", str(tmp_path), "--budget", "3", "--", "--stage-epochs", "1"))
    with pytest.raises(SystemExit, match="less than the stages"):
        rt.main(parse("--dataset", "synthetic", "--out", str(tmp_path), "--budget", "2"))
    with pytest.raises(SystemExit, match="unknown --cells"):
        rt.main(parse("--dataset", "synthetic", "--out", str(tmp_path), "--cells", "s_s"))


def test_runs_a_cell_then_resumes_without_rerunning(tiny_voc, tmp_path, monkeypatch):
    argv = ["--dataset", "synthetic", "--data-root", str(tiny_voc), "--seeds", "1", "--out", str(tmp_path),
            "--budget", "3", "--cells", "s", "--", *TINY]
    assert rt.main(parse(*argv)) == 0
    folder = tmp_path / "runs" / "s" / "seed0"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"mIoU", "fg_mIoU", "iIoU", "pixel_acc"} <= set(metrics)
    assert list((folder / "tensorboard").rglob("events.out.tfevents.*")) and not (folder / "checkpoints").exists()
    assert [s["epochs"] for s in json.loads((folder / "run_config.json").read_text())["stages"]] == [3]
    report = (tmp_path / "results.md").read_text()
    assert "**equal budget**: every schedule trains 3 epochs" in report and "d_s_b: 1+1+1" in report
    assert f"| single-decoder model | no | {metrics['mIoU']:.4f} |" in report
    assert (tmp_path / "results.png").stat().st_size > 0
    mtime = (folder / "metrics.json").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    assert rt.main(parse(*argv)) == 0  # everything finished: only the report is rewritten
    assert (folder / "metrics.json").stat().st_mtime_ns == mtime
    other = list(argv)
    other[other.index("--budget") + 1] = "6"
    with pytest.raises(SystemExit, match="other settings"):  # another budget would mix incomparable runs
        rt.main(parse(*other))


def test_label_count_sweep_shares_the_depth_stage_and_reports_per_count(tiny_voc, tmp_path):
    """--labelled: nested subsets written, every schedule at every count, the depth stage trained once per seed and
    reused by the three other runs that start with it, the report per labelled count with paired differences."""
    root = tmp_path / "voc"
    import shutil

    shutil.copytree(tiny_voc, root)
    out = tmp_path / "labels"
    argv = ["--dataset", "synthetic", "--data-root", str(root), "--seeds", "2", "--out", str(out),
            "--labelled", "4", "all", "--schedules", "s", "d_s_b", "d_s_b_copy",
            "--schedule-steps", "s=2", "d_s_b=2,1,1", "--", "--depth-only", "rest", "--val-every", "1",
            *[a for a in TINY if a != "--max-steps-per-epoch" and a != "1"]]
    assert rt.main(parse(*argv)) == 0
    subset = (root / "ImageSets/Segmentation/train_n4.txt").read_text().split()
    assert len(subset) == 4 and set(subset) < set((root / "ImageSets/Segmentation/train.txt").read_text().split())
    runs = {p.parent.parent.name + "/" + p.parent.name + "/" + p.name: json.loads((p / "run_config.json").read_text())
            for p in (out / "runs").glob("*/*/seed*")}
    assert len(runs) == 12
    reused = {k: v["reused_prefix"] for k, v in runs.items() if "reused_prefix" in v}
    assert len(reused) == 6 and all(r["stages"] == 1 for r in reused.values())  # 4 d_s_b runs a seed, 1 trains it
    assert {runs[k]["images"]["labelled"]["count"] for k in runs} == {4, 16}
    assert not (out / "prefixes").exists()  # the store goes once every run finished
    report = (out / "results.md").read_text()
    assert "| schedule | 4 labelled | 16 labelled |" in report and "6 runs started from a stage prefix" in report
    assert "## Paired differences against `s` (fg_mIoU), per labelled count" in report
    assert report.count("| `d_s_b") == 3 * 2  # fg_mIoU, differences and curve tables... per schedule row
    assert (out / "labels.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results_seeds.csv")))
    assert len(rows) == 12 and {r["labelled"] for r in rows} == {"4", "16"}
