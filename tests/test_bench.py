"""tools/bench.py (benchmarks/) at tiny sizes: FLOP counts, case building, interleaving, what the default run and
the full sweep cover, which precisions a machine skips, the estimate, targets, the report's structure and its progress
bar (never timings)."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from models import ModelConfig, build_model
from benchmarks import estimate, inference, loading, memory, report, timing, training
from benchmarks.peer import SmpWithDepth, peer_focal_loss
from models.deploy import forward_flops
from run_state import machine
from tools import bench


def conv_flops(model: nn.Module, x: torch.Tensor, **kwargs) -> int:
    """Independent count: 2 * output elements * (input channels / groups) * kernel area, summed over every conv
    module."""
    total = 0

    def hook(conv, inputs, out):
        nonlocal total
        total += 2 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x, **kwargs)
    for h in handles:
        h.remove()
    return total


def test_forward_flops_equal_an_independent_conv_count():
    model = build_model(ModelConfig(encoder="resnet18")).eval()
    x = torch.randn(2, 3, 64, 96)
    seg, joint = (forward_flops(model, x, tasks=t) for t in (("seg",), ("seg", "depth")))
    assert seg == conv_flops(model, x, tasks=("seg",)) > 0
    assert joint == conv_flops(model, x, tasks=("seg", "depth"))
    head_diff = 2 * 2 * 64 * 96 * 16 * 9 * (21 - 1)  # the depth head has 1 output channel, the seg head 21
    assert joint - seg == seg - head_diff - forward_flops(model.encoder, x)  # depth decoder = seg decoder, smaller head


def test_our_seg_model_costs_what_smps_unet_costs():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ours = build_model(ModelConfig(encoder="resnet18", tasks=("seg",))).eval()
    peer = smp.Unet("resnet18", encoder_weights=None, classes=21).eval()
    x = torch.randn(1, 3, 64, 64)
    assert forward_flops(ours, x) == forward_flops(peer, x) == conv_flops(peer, x)
    both = build_model(ModelConfig(encoder="resnet18")).eval()  # and the both stage: a second decoder, a 1-channel head
    assert forward_flops(both, x, tasks=("seg", "depth")) == forward_flops(SmpWithDepth(peer), x)


def test_the_peers_loss_is_our_focal_loss():
    from models import FocalLoss

    logits = torch.randn(2, 21, 16, 24, dtype=torch.float64)
    target = torch.randint(0, 21, (2, 16, 24))
    target[:, :3] = 255
    assert torch.allclose(peer_focal_loss(logits, target), FocalLoss()(logits, target), rtol=1e-6)


@pytest.mark.parametrize("peer, task", [("ours", "both"), ("smp", "seg"), ("smp", "both")])
def test_train_case_runs_the_step_and_counts_three_forwards(peer, task, fresh_accelerate):
    if peer == "smp":
        pytest.importorskip("segmentation_models_pytorch")
    spec = training.TrainSpec(peer, task, "bf16", "CL", 2, 64, "resnet18")
    accelerator = timing.fresh_accelerator("bf16", torch.device("cpu")) if peer == "ours" else None
    cache = {}
    case = training.build_train_case(spec, torch.device("cpu"), accelerator, cache)
    model, _ = cache[dataclasses.replace(spec, batch=0, side=0)]
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = case.step()
    assert seen == [torch.bfloat16]  # autocast is on: Accelerate's for ours, torch.autocast for smp
    assert (loss[0] if isinstance(loss, tuple) else loss).isfinite()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)  # it trained
    if task == "both":  # and so did the depth decoder
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before and "depth" in n)
    assert case.images == 2
    assert case.flops == 3 * 2 * case.meta["forward_flops_per_image"]
    unwrapped = getattr(model, "module", model)
    tasks = {"tasks": training.STAGES["both"].tasks} if peer == "ours" else {}
    assert case.meta["forward_flops_per_image"] * 2 == conv_flops(unwrapped, timing.make_batch(2, 64, "cpu")["image"], **tasks)


def test_run_interleaved_warms_up_then_goes_round_robin():
    calls = []
    cases = [timing.Case(name, (lambda name=name: calls.append(name)), 1, 1.0) for name in "abc"]
    settings = timing.Settings(warmup=2, steps=6, rounds=3)
    timing.run_interleaved(cases, settings, torch.device("cpu"), what="letters")
    # warm-up a, b, c in order; then 3 rounds of 2 steps each, every round a (seeded) permutation of the cases
    assert calls[:6] == list("aabbcc")
    rounds = ["".join(calls[6 + 6 * r: 12 + 6 * r: 2]) for r in range(3)]
    assert calls[6:] == [c for order in rounds for c in order for _ in range(2)]
    assert all(sorted(order) == list("abc") for order in rounds)
    assert rounds == ["".join(c.name for c in timing.round_order(cases, r)) for r in range(3)]
    assert len({timing.round_order(cases, r)[0].name for r in range(20)}) == 3  # every case gets to run first
    assert all(len(c.times) == 6 and all(t >= 0 for t in c.times) for c in cases)
    row = cases[0].row()
    assert row["steps_timed"] == 6 and row["images_per_s"] == 1 / row["median_s"]
    assert row["times_s"] == cases[0].times and row["median_s"] == sum(sorted(row["times_s"])[2:4]) / 2  # the raw steps


def fake_report() -> dict:
    train = []
    for peer, task, precision, layout, fused, ips in [
            ("ours", "seg", "fp32", "CL", True, 5.0), ("ours", "both", "fp32", "CL", True, 4.0),
            ("ours", "seg", "bf16", "CL", False, 1.0),  # an ablation row: never a target's
            ("ours", "seg", "bf16", "CL", True, 8.0), ("ours", "both", "bf16", "CL", True, 5.0),
            ("smp", "seg", "fp32", "NCHW", True, 4.0), ("smp", "seg", "bf16", "CL", True, 8.5)]:
        train.append({"peer": peer, "task": task, "precision": precision, "layout": layout, "batch": 4, "side": 256,
                      "compile": False, "fused_adam": fused, "images_per_s": ips, "median_s": 4 / ips,
                      "flops_per_s": 100.0 * ips})
    peaks = [{"kind": "mm", "precision": p, "flops_per_s": v} for p, v in (("fp32", 500.0), ("bf16", 1000.0))]
    infer = [{"model": m, "precision": p, "batch": 1, "side": 512, "median_s": t}
             for m, t in (("exported seg-only", 1.02), ("single-decoder", 1.0)) for p in ("fp32", "bf16")]
    data = [{"kind": "loader", "batch": 4, "side": 256, "images_per_s": 14.0}]
    return {"train": train, "peaks": peaks, "inference": infer, "data": data, "default_precision": "fp32"}


def test_targets_are_the_issues_ratios():
    got = {t["target"]: (t["value"], t["met"]) for t in report.targets(fake_report())}
    assert got["4x256 seg-only step, default (fp32) / smp fp32 NCHW"] == (5.0 / 4.0, True)
    assert got["4x256 seg-only step, bf16 / smp channels_last + bf16"] == (8.0 / 8.5, False)
    assert got["4x256 both-stage step time / seg-only, fp32"] == (5.0 / 4.0, True)
    assert got["4x256 both-stage step time / seg-only, bf16"] == (8.0 / 5.0, False)
    assert got["4x256 training FLOP/s bf16 / torch.mm bf16"] == (0.8, True)
    assert got["4x256 data loading / training step (fp32) images/s"] == (14.0 / 5.0, False)
    assert got["exported / single-decoder latency, batch 1 fp32"] == (pytest.approx(1.02), True)
    assert len(got) == 8


def test_targets_of_a_run_with_one_precision_leave_the_others_out():
    """tools/gpu_check.py runs bf16 only: no fp32 rows, so no target that needs one (train.py's default is fp32)."""
    fake = fake_report()
    fake["train"] = [r for r in fake["train"] if r["precision"] == "bf16"]
    fake["inference"] = [r for r in fake["inference"] if r["precision"] == "bf16"]
    got = {t["target"] for t in report.targets(fake)}
    assert got == {"4x256 seg-only step, bf16 / smp channels_last + bf16", "4x256 both-stage step time / seg-only, bf16",
                   "4x256 training FLOP/s bf16 / torch.mm bf16", "exported / single-decoder latency, batch 1 bf16"}
    assert [r["precision"] for r in report.second_decoder(fake["train"])] == ["bf16"]


def test_the_default_run_covers_the_targets():
    """The default run is a subset of the full sweep: one shape, ours at train.py's defaults, smp's default and
    fastest; the full sweep adds 2x512 and the ablations."""
    default, full = ({s.name for p in ("fp32", "bf16") for s in training.train_specs(cfg, p, True, False)}
                     for cfg in (timing.DEFAULT, timing.FULL))
    assert default == {f"{who} 4x256 {p} CL" for who in ("ours seg-only", "ours both") for p in ("fp32", "bf16")} | {
        "smp Unet(resnet50) 4x256 fp32 NCHW", "smp Unet(resnet50) + 2nd decoder 4x256 fp32 NCHW",
        "smp Unet(resnet50) 4x256 bf16 CL", "smp Unet(resnet50) + 2nd decoder 4x256 bf16 CL"}
    assert default < full and {s.split()[-1] for s in full - default} >= {"--no-fused-adam", "CL"}
    assert any("2x512" in s for s in full)
    assert timing.DEFAULT.infer_batches == (1,) and timing.FULL.infer_batches == (1, 8)
    for field in ("warmup", "steps", "rounds", "infer_reps"):  # the same repetitions: ratios comparable across the two
        assert getattr(timing.DEFAULT, field) == getattr(timing.FULL, field)


def test_flags_pick_the_settings():
    parse = bench.get_args_parser().parse_args
    assert timing.choose_settings() == timing.DEFAULT and timing.choose_settings(full=True) == timing.FULL
    assert timing.choose_settings(quick=True) == timing.QUICK and timing.choose_settings(True, True) == timing.QUICK_FULL
    args = parse(["--precision", "bf16", "--train-shapes", "16x256,8x512", "--infer-batches", "1,8"])
    assert (args.precision, args.train_shapes, args.infer_batches, args.encoder) == (("bf16",), ((16, 256), (8, 512)),
                                                                                     (1, 8), None)
    got = timing.choose_settings(precisions=args.precision, train_shapes=args.train_shapes, encoder=None)
    assert got == dataclasses.replace(timing.DEFAULT, precisions=("bf16",), train_shapes=((16, 256), (8, 512)))
    with pytest.raises(SystemExit):
        parse(["--precision", "fp16"])
    with pytest.raises(SystemExit):  # no hidden self-invocation: memory cases run in spawned processes
        parse(["--memory-case", "{}"])


def test_precisions_the_cpu_would_emulate_are_skipped_with_the_reason(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    settings, skipped = timing.native_only(timing.DEFAULT, cpu, allow_emulated=False)
    assert settings.precisions == ("fp32",) and list(skipped) == ["bf16"]
    assert "neither AVX512-BF16 nor AMX" in skipped["bf16"] and "emulated" in skipped["bf16"]
    assert timing.native_only(timing.DEFAULT, cpu, allow_emulated=True) == (timing.DEFAULT, {})
    with pytest.raises(SystemExit, match="--allow-emulated"):
        timing.native_only(dataclasses.replace(timing.DEFAULT, precisions=("bf16",)), cpu, allow_emulated=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # bf16 in hardware ...
    assert machine.cpu_bf16_native() and machine.emulated_precisions(cpu, ("fp32", "bf16")) == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # ... that oneDNN is told not to use
    assert not machine.cpu_bf16_native()
    assert "ONEDNN_MAX_CPU_ISA=avx2" in machine.emulated_precisions(cpu, ("fp32", "bf16"))["bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert machine.cpu_bf16_native()
    assert machine.emulated_precisions(cpu, ("fp32",)) == {}


def test_the_estimate_costs_each_planned_step_by_its_pixels():
    settings = dataclasses.replace(timing.DEFAULT, precisions=("fp32",), train_shapes=((4, 256), (2, 512)))
    one, two = (estimate.planned_seconds(settings, unit, True, False, 0, 2) for unit in (1.0, 2.0))
    fixed = (estimate.CASE_SECONDS * len(training.train_specs(settings, "fp32", True, False))
             + estimate.LOADER_IMAGE_SECONDS * (4 + 2) * settings.loader_batches)  # what no step time scales
    assert two - fixed == pytest.approx(2 * (one - fixed))  # linear in the measured step time
    with_memory = estimate.planned_seconds(settings, 1.0, True, False, 4, 2)
    assert with_memory - one == pytest.approx(4 * (estimate.SPAWN_SECONDS + 3) / 2)
    fewer = estimate.planned_seconds(dataclasses.replace(settings, train_shapes=((4, 256),)), 1.0, True, False, 0, 2)
    assert fewer < one
    text = estimate.describe(600.0, 1.5, settings)
    assert "about 10 min (likely 5 to 15 min)" in text and "4x256 fp32 (1.50 s)" in text


def test_a_run_without_native_bf16_says_so_and_has_no_bf16_rows(tiny_voc, tmp_path, fresh_accelerate, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(machine, "cpu_bf16_native", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    out = tmp_path / "bench.json"
    bench.main(bench.get_args_parser().parse_args(["--quick", "--no-smp", "--no-memory", "--no-progress",
                                                   "--data-root", str(tiny_voc), "--json", str(out)]))
    rep = json.loads(out.read_text())
    assert list(rep["skipped_precisions"]) == ["bf16"] and rep["settings"]["precisions"] == ["fp32"]
    assert {r["precision"] for r in rep["train"] + rep["peaks"] + rep["inference"]} == {"fp32"}
    printed = capsys.readouterr().out
    assert printed.startswith("skipping bf16: this CPU has neither AVX512-BF16 nor AMX")
    assert "bf16 skipped: this CPU has neither" in printed  # in the tables' machine line too


def test_peak_memory_of_a_fresh_process_holds_the_optimizer_state():
    spec = training.TrainSpec("ours", "seg", "fp32", "CL", 1, 64, "resnet18")
    peak, peak_again = memory.peak_memory([spec, spec], torch.device("cpu"))
    model = build_model(ModelConfig(encoder="resnet18"))
    model.set_trainable(("seg",))
    trainable_mib = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / 2**20
    assert 3 * trainable_mib < peak < 4000  # at least gradients and Adam's two moments
    assert abs(peak - peak_again) < 0.2 * peak  # two processes side by side measure the same


def test_quick_full_run_reports_every_row_and_the_bar_counts_every_step(tiny_voc, tmp_path, fresh_accelerate, capsys):
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(["--quick", "--full", "--no-memory", "--data-root", str(tiny_voc),
                                               "--json", str(out), "--allow-emulated"])
    bench.main(args)
    rep = json.loads(out.read_text())
    names = [r["name"] for r in rep["train"]]
    expected = {f"ours {t} 2x64 {p} CL" for t in ("seg-only", "both") for p in ("fp32", "bf16")}
    expected |= {f"ours seg-only 2x64 {p} CL --no-fused-adam" for p in ("fp32", "bf16")}
    with_smp = "segmentation_models_pytorch" in rep["machine"]
    if with_smp:
        expected |= {"smp Unet(resnet18) 2x64 fp32 NCHW", "smp Unet(resnet18) 2x64 fp32 CL", "smp Unet(resnet18) 2x64 bf16 CL"}
        expected |= {"smp Unet(resnet18) + 2nd decoder 2x64 fp32 NCHW", "smp Unet(resnet18) + 2nd decoder 2x64 bf16 CL"}
    assert expected == set(names)
    settings = timing.QUICK_FULL
    for row in rep["train"]:
        assert row["images_per_s"] > 0 and row["steps_timed"] == settings.steps
        assert row["flops_per_step"] == 3 * row["batch"] * row["forward_flops_per_image"]
    seg = {r["precision"]: r["forward_flops_per_image"] for r in rep["train"] if r["name"].startswith("ours seg-only")}
    assert seg["fp32"] == seg["bf16"] > 0
    assert {r["kind"] for r in rep["peaks"]} == {"mm", "conv"}
    mm = next(r for r in rep["peaks"] if r["kind"] == "mm")
    assert mm["flops_per_step"] == 2 * settings.mm_side**3
    models = {r["model"] for r in rep["inference"]}
    assert {"exported seg-only", "single-decoder"} <= models and len(models) == 2 + with_smp
    assert len(rep["inference"]) == len(models) * 2 * len(settings.infer_batches)
    assert all(r["steps_timed"] == (3 if r["batch"] == 1 else 1) * settings.infer_reps for r in rep["inference"])
    assert [d["kind"] for d in rep["data"]] == ["loader", "end-to-end"] and all(d["images_per_s"] > 0 for d in rep["data"])
    assert rep["data"][0]["with_depth"] is True  # the synthetic set has pseudo depth: the heavier loader
    assert rep["targets"] and all(isinstance(t["met"], bool) for t in rep["targets"])
    ips = {r["name"]: r["images_per_s"] for r in rep["train"]}
    assert [r["ours"] for r in rep["second_decoder"]] == [ips[f"ours seg-only 2x64 {p} CL"] / ips[f"ours both 2x64 {p} CL"]
                                                          for p in ("fp32", "bf16")]
    if with_smp:
        assert [r["smp"] for r in rep["second_decoder"]] == [
            ips[f"smp Unet(resnet18) 2x64 {p} {lay}"] / ips[f"smp Unet(resnet18) + 2nd decoder 2x64 {p} {lay}"]
            for p, lay in (("fp32", "NCHW"), ("bf16", "CL"))]
    printed = capsys.readouterr()
    said = printed.out.index("estimated duration: about")  # --full says it before it starts
    assert rep["estimated_seconds"] > 0 and said < printed.out.index("| case | img/s |")
    assert "| target | measured | goal | met |" in printed.out and "| shape | precision | ours | smp |" in printed.out
    total = (training.planned_steps(settings, with_smp, False) + inference.planned_steps(settings, with_smp)
             + loading.planned_steps(settings))
    assert f"{total}/{total}" in printed.err and f"{total + 1}/" not in printed.err  # the bar ends at its total
    for what in ("training fp32: round 1/1", "training bf16: warm-up", "inference batch 2x64", "data loading (voc)"):
        assert what in printed.err
