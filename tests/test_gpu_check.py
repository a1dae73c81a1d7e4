"""tools/gpu_check.py: on a GPU it runs what BENCHMARKS.md asks for within 8 minutes; here it runs as a user would
check it, `--device cpu --quick`, and writes one results file with the bench's tables and the training's epochs."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

from tools import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_commands_are_the_ones_benchmarks_md_asks_for(capsys, tmp_path):
    out = tmp_path / "out"
    args = gpu_check.get_args_parser().parse_args(["--dry-run", "--out", str(out)])
    assert gpu_check.main(args) == {"ok": True} and not out.exists()  # it ran nothing
    bench, run = (shlex.split(line) for line in capsys.readouterr().out.splitlines())
    assert bench[1:9] == ["tools/bench.py", "--device", "cuda", "--precision", "bf16", "--train-shapes", "16x256,8x512",
                          "--infer-batches"]
    i = run.index("train.py")
    assert run[:i] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                       "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    assert run[i:] == ["train.py", "--schedule", "d_s_b", "--copy-weights", "--mixed-precision", "bf16", "--output-dir",
                       str(out / "run")]  # the preset's default run: synthetic set, 3 epochs a stage
    assert args.bench_timeout + args.train_timeout <= 7.5 * 60  # the whole check within 8 minutes


def test_cpu_quick_run_writes_the_results_file(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = (out / "results.md").read_text()
    assert results.count("exit code 0") == 2 and "stopped at the time limit" not in results
    for table in ("| case | img/s | ms/step |", "| target | measured | goal | met |",
                  "| stage | epoch | steps | done at s | train loss | val mIoU | val fg_mIoU | pixel acc |"):
        assert table in results
    command = next(line for line in results.splitlines() if line.startswith("`train.py"))
    assert command.startswith("`train.py --schedule d_s_b --copy-weights --mixed-precision bf16")
    epochs = [line for line in results.splitlines() if line.startswith(("| 0 (d)", "| 1 (s)", "| 2 (b)"))]
    assert len(epochs) == 3 and "Final: mIoU" in results
    done_at = [float(line.split(" | ")[3]) for line in epochs]
    assert done_at == sorted(set(done_at)) and done_at[-1] < 600  # seconds since the start, one time per epoch
    rows = json.loads((out / "bench.json").read_text())["train"]
    assert {r["precision"] for r in rows} == {"bf16"}
    assert {r["task"] for r in rows if r["peer"] == "ours"} == {"seg", "both"}
    assert results == proc.stdout[proc.stdout.index("# GPU check"):]  # also printed, for the device tool's output
