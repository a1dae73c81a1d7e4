"""Paired differences with 95% intervals, validation curves and the report section of tools/run_tables.py."""
import json
import math

import pytest
from PIL import Image

from sweeps import plots
from sweeps import stats as st
from sweeps.cells import Cell
from sweeps.tables import BASELINE, table_rows


def test_t_quantiles_match_the_table():
    assert st.t975(1) == 12.706 and st.t975(4) == 2.776 and st.t975(30) == 2.042
    assert st.t975(35) == 2.042  # between table entries: the smaller df's (wider) value
    assert st.t975(45) == 2.021 and st.t975(200) == 1.980 and st.t975(5000) == 1.960
    with pytest.raises(ValueError):
        st.t975(0)


def test_paired_difference_by_hand():
    # diffs 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), half width t(4) * sd / sqrt(5) = 2.776 * 1.58114 / 2.23607 = 1.96293
    values = {s: 10.0 + s + 1 for s in range(5)}
    baseline = {s: 10.0 for s in range(5)}
    diff = st.paired_difference(values, baseline)
    assert diff["n"] == 5 and diff["mean"] == pytest.approx(3.0)
    assert diff["sd"] == pytest.approx(math.sqrt(2.5))
    assert diff["lo"] == pytest.approx(3.0 - 1.96293, abs=1e-5) and diff["hi"] == pytest.approx(3.0 + 1.96293, abs=1e-5)
    assert st.verdict(diff) == "better"


def test_pairing_uses_only_common_seeds_and_needs_two():
    # seed 2 has no baseline; the pair (0, 1): diffs -0.1, -0.3 -> mean -0.2, sd 0.141421, half 12.706 * 0.1 = 1.2706
    diff = st.paired_difference({0: 0.5, 1: 0.4, 2: 0.9}, {0: 0.6, 1: 0.7})
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(-0.2)
    assert diff["hi"] - diff["mean"] == pytest.approx(1.2706, abs=1e-4)
    assert st.verdict(diff) == "not distinguishable"
    assert st.paired_difference({0: 0.5}, {0: 0.4}) is None and st.verdict(None) == "too few seeds"
    assert st.verdict({"lo": -0.3, "hi": -0.1}) == "worse"


def test_curves_from_logs(tmp_path):
    for seed, values in enumerate([(0.2, 0.5, 0.6), (0.4, 0.7, 0.6)]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        lines = [{"global_step": 10 * (i + 1), "val": {"fg_mIoU": v}} for i, v in enumerate(values)]
        (folder / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = [st.read_curve(tmp_path / f"seed{s}") for s in range(2)]
    assert curves[0] == [(10, 0.2), (20, 0.5), (30, 0.6)]
    mean = st.mean_curve(curves + [[]])  # a run without a log does not count
    assert mean == [(10, pytest.approx(0.3)), (20, pytest.approx(0.6)), (30, pytest.approx(0.6))]
    assert not st.is_flat(mean) and st.is_flat(mean, last=2) and not st.is_flat(mean[:1], last=2)
    plots.curve_plot({"s": mean, "b": [(10, 0.1), (30, 0.2)]}, tmp_path / "curves.png", "title")
    img = Image.open(tmp_path / "curves.png").convert("RGB")
    colours = {img.getpixel((x, y)) for x in range(0, img.width, 2) for y in range(0, img.height, 2)}
    assert plots.CURVE_COLOURS[0] in colours and plots.CURVE_COLOURS[1] in colours


def test_differences_section_pairs_rows_with_the_baseline():
    results = {BASELINE: [{"seed": s, "fg_mIoU": 0.5, "mIoU": 0.5} for s in range(3)],
               Cell("d_s_b", True): [{"seed": s, "fg_mIoU": 0.6 + 0.01 * s, "mIoU": 0.5} for s in range(3)]}
    text = st.differences(table_rows(), results, BASELINE)
    row = next(line for line in text.splitlines() if line.startswith("| 2: d_s_b_copy"))
    # diffs 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half 4.303 * 0.01 / sqrt(3) = 0.0248
    assert "+0.1100 [+0.0852, +0.1348] better" in row and row.endswith("| 3 |")
    assert "+0.0000 [+0.0000, +0.0000] not distinguishable" in row  # mIoU: equal in every seed
    assert text.count("d_s_b_copy") == 1  # in both tables, compared once
    assert "| 2: b | – | – | 0 |" in text  # not run
