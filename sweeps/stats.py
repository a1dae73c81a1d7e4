"""Statistics of a sweep (tools/run_tables.py): paired differences over seeds with 95% CIs, validation curves.

Seeds pair the runs: seed k of every schedule starts from the same weights and sees the same batches in the
same order (train.py is deterministic in the seed), so schedule - baseline is compared seed by seed, which
removes the part of the seed-to-seed spread that both runs share.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), for df = 1..30; beyond, the table's tail (df 40, 60, 120)
# and the normal's 1.960. Values from any statistics table (e.g. scipy.stats.t.ppf(0.975, df)).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
T975_TAIL = ((40, 2.021), (60, 2.000), (120, 1.980))
Z975 = 1.960


def t975(df: int) -> float:
    """t_{0.975} with df degrees of freedom (df >= 1); between the tail's entries, the next smaller df's value."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    value = T975[-1]
    for at, t in T975_TAIL:
        if df >= at:
            value = t
    return value if df < 1000 else Z975


def summarise(values: list[float]) -> tuple[float, float, int] | None:
    """(mean, sample std (n-1; 0 for one value), n), or None for no values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict | None:
    """Mean of values[seed] - baseline[seed] over the seeds both have, with its 95% t interval; None if < 2 seeds."""
    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(diffs), "sd": sd}


def verdict(diff: dict | None) -> str:
    """Plain words for a paired difference: better, worse, or no difference the seeds can tell."""
    if diff is None:
        return "too few seeds"
    if diff["lo"] > 0:
        return "better"
    if diff["hi"] < 0:
        return "worse"
    return "not distinguishable"


def read_curve(folder: Path, metric: str = "fg_mIoU") -> list[tuple[int, float]]:
    """(global step, validation metric) after every epoch of one run, from its log.jsonl."""
    path = folder / "log.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(line["global_step"], line["val"][metric]) for line in lines if metric in line.get("val", {})]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over runs of curves validated at the same steps (the steps common to all of them)."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, statistics.fmean(c[s] for c in curves)) for s in steps]


def is_flat(curve: list[tuple[int, float]], last: int = 3, tol: float = 0.02) -> bool:
    """True if the curve's last `last` points lie within `tol` of each other (trained to a plateau)."""
    tail = [v for _, v in curve[-last:]]
    return len(tail) == last and max(tail) - min(tail) <= tol


def differences(rows: list, results: dict, baseline, metrics=("fg_mIoU", "mIoU")) -> str:
    """Markdown: each row's paired difference from the baseline over seeds, mean [95% CI], and what it says."""
    base = {m: {r["seed"]: r[m] for r in results.get(baseline, []) if m in r} for m in metrics}
    lines = [f"### Against `{baseline.name}`, paired by seed", "",
             f"Mean of (row − `{baseline.name}`) over the seeds both finished, with its 95% confidence interval (Student's t, "
             "n − 1 degrees of freedom); *better* / *worse* when the interval excludes 0.", "",
             "| row | " + " | ".join(f"Δ {m} [95% CI]" for m in metrics) + " | seeds |", "|---|" + "---|" * (len(metrics) + 1)]
    first = {}
    for r in rows:  # a cell once (d_s_b with copy is in both tables), at its first row
        first.setdefault(r.cell, r)
    for row in (r for r in first.values() if r.cell != baseline):
        cells, n = [], 0
        for m in metrics:
            diff = paired_difference({r["seed"]: r[m] for r in results.get(row.cell, []) if m in r}, base[m])
            n = max(n, diff["n"] if diff else 0)
            cells.append("–" if diff is None else
                         f"{diff['mean']:+.4f} [{diff['lo']:+.4f}, {diff['hi']:+.4f}] {verdict(diff)}")
        lines.append(f"| {row.table[-1]}: {row.cell.name} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def baseline_note(curve: list[tuple[int, float]]) -> str:
    """Whether the baseline trained to a plateau: its last three validations (mean over seeds)."""
    if not curve:
        return "Baseline `s`: no validation curve."
    tail = ", ".join(f"{v:.4f}" for _, v in curve[-3:])
    flat = "flat (within 0.02)" if is_flat(curve) else "**still moving** (more than 0.02 apart)"
    return f"Baseline `s`, mean fg_mIoU at its last three validations: {tail}: {flat}."
