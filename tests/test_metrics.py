"""Metric tests: hand-computed cases (255 included), batching invariance, torchmetrics parity, slow references."""
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from evaluation.metrics import ConfusionMatrix, DepthMetrics, InstanceIoU


def _hand_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes, one ignored pixel that is predicted 2 (it must not count as a false positive)."""
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    return pred, target


def _random_pair(seed: int, b: int = 6, k: int = 5, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random labels with ~10% ignored pixels, predictions right about half the time."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (b, size, size), generator=g)
    other = torch.randint(0, k, (b, size, size), generator=g)
    pred = torch.where(torch.rand(b, size, size, generator=g) < 0.5, target, other)
    target[torch.rand(b, size, size, generator=g) < 0.1] = 255
    return pred, target


def _blobs(seed: int, b: int = 4, k: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectangles of random classes on background with 255 borders; instance ids; a shifted, noisy prediction."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(b, size, size, dtype=torch.long)
    inst = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        for j in range(1, 1 + int(torch.randint(1, 5, (1,), generator=g))):
            y, x = torch.randint(0, size - 4, (2,), generator=g).tolist()
            h, w = torch.randint(2, 12, (2,), generator=g).tolist()
            c = int(torch.randint(1, k, (1,), generator=g))
            target[i, max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1] = 255
            inst[i, max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1] = 255
            target[i, y : y + h, x : x + w] = c
            inst[i, y : y + h, x : x + w] = j
    pred = torch.roll(target, shifts=(1, 2), dims=(1, 2)).clone()
    pred[pred == 255] = 0
    noise = torch.rand(b, size, size, generator=g) < 0.05
    pred[noise] = torch.randint(0, k, (int(noise.sum()),), generator=g)
    return pred, target, inst


# ---------------------------------------------------------------- confusion matrix


def test_confusion_hand_computed():
    # pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,0); (255,2) ignored
    # rows gt: [1,1,0] [1,2,0] [1,0,1]; TP=[1,2,1], gt=[2,3,2], pred=[3,3,1]
    # union = gt + pred - TP = [4,4,2] -> IoU = [1/4, 1/2, 1/2]
    cm = ConfusionMatrix(3)
    cm.update(*_hand_pair())
    assert cm.mat.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    m = cm.compute()
    assert m["iou"] == pytest.approx([0.25, 0.5, 0.5])
    assert m["mIoU"] == pytest.approx(5 / 12)
    assert m["fg_mIoU"] == pytest.approx(0.5)
    assert m["pixel_acc"] == pytest.approx(4 / 7)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m["absent_classes"] == []
    assert all(isinstance(v, float) for v in (m["mIoU"], m["fg_mIoU"], m["pixel_acc"]))
    text = str(cm)
    assert "25.00" in text and "mIoU 41.67" in text


def test_absent_class_left_out_and_reported():
    # K=4: class 3 never labelled nor predicted; class 2 only predicted (a false positive: present, IoU 0)
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    pred = torch.tensor([[[0, 2, 1, 1, 3]]])  # the 3 sits on an ignored pixel
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    assert m["absent_classes"] == [3]
    assert m["iou"][3] is None
    assert m["iou"][:3] == pytest.approx([0.5, 1.0, 0.0])
    assert m["mIoU"] == pytest.approx(1.5 / 3)
    assert m["fg_mIoU"] == pytest.approx(1.0 / 2)
    assert m["pixel_acc"] == pytest.approx(3 / 4)
    assert "absent" in str(cm) and "[3]" in str(cm)


def test_batch_counts_shape_device_and_rows():
    pred, target = _random_pair(0)
    counts = ConfusionMatrix.batch_counts(pred, target, 5)
    assert counts.shape == (6, 25) and counts.dtype == torch.int64
    # one row per sample: its total is that sample's labelled pixels
    assert counts.sum(1).tolist() == (target != 255).flatten(1).sum(1).tolist()
    assert torch.equal(counts[2], ConfusionMatrix.batch_counts(pred[2:3], target[2:3], 5)[0])


def test_update_counts_equals_update_pred_and_order_free():
    pred, target = _random_pair(1, b=8)
    direct = ConfusionMatrix(5)
    direct.update(pred, target)
    via_counts = ConfusionMatrix(5)
    via_counts.update(counts=ConfusionMatrix.batch_counts(pred, target, 5))
    chunked = ConfusionMatrix(5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    for idx in (perm[:3], perm[3:4], perm[4:]):
        chunked.update(counts=ConfusionMatrix.batch_counts(pred[idx], target[idx], 5))
    assert torch.equal(direct.mat, via_counts.mat) and torch.equal(direct.mat, chunked.mat)
    assert direct.compute() == chunked.compute()
    direct.reset()
    assert math.isnan(direct.compute()["pixel_acc"]) and direct.compute()["absent_classes"] == list(range(5))


@pytest.mark.parametrize("kind", ["random", "blobs"])
def test_parity_with_torchmetrics(kind):
    k = 6
    pred, target = _random_pair(2, k=k) if kind == "random" else _blobs(3, k=k)[:2]
    cm = ConfusionMatrix(k)
    jac = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average=None)
    accm = MulticlassAccuracy(num_classes=k, ignore_index=255, average="micro")
    for i in range(pred.shape[0]):
        cm.update(pred[i : i + 1], target[i : i + 1])
        jac.update(pred[i : i + 1], target[i : i + 1])
        accm.update(pred[i : i + 1], target[i : i + 1])
    m = cm.compute()
    ref = jac.compute().double()
    present = [c for c in range(k) if m["iou"][c] is not None]
    assert len(present) >= 3
    # torchmetrics scores absent classes 0 (or NaN), so compare only where the class is present
    assert [m["iou"][c] for c in present] == pytest.approx(ref[present].tolist(), abs=1e-6)
    assert m["mIoU"] == pytest.approx(ref[present].mean().item(), abs=1e-6)
    assert m["fg_mIoU"] == pytest.approx(ref[[c for c in present if c > 0]].mean().item(), abs=1e-6)
    assert m["pixel_acc"] == pytest.approx(accm.compute().item(), abs=1e-6)


# ---------------------------------------------------------------- instance IoU


def _iiou_hand() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of 14 pixels (H=1); see test_iiou_hand_computed for the arithmetic."""
    #            A (cls 1, id 1)  C (cls 2, id 2)   bg       ignored
    t0 = [1, 1, 1, 1] + [2, 2, 2, 2, 2] + [0, 0, 0] + [255, 255]
    i0 = [1, 1, 1, 1] + [2, 2, 2, 2, 2] + [0, 0, 0] + [255, 255]
    p0 = [1, 1, 1, 0] + [2, 2, 2, 2, 1] + [1, 1, 0] + [1, 2]
    #            B (cls 1, id 1 in its own image)   bg (one bg pixel carries id 1: not part of B)
    t1 = [1] * 12 + [0, 0]
    i1 = [1] * 12 + [1, 0]
    p1 = [1] * 6 + [2] * 6 + [0, 0]
    as_t = lambda rows: torch.tensor(rows).view(2, 1, 14)  # noqa: E731
    return as_t([p0, p1]), as_t([t0, t1]), as_t([i0, i1])


def test_iiou_hand_computed():
    # class 1: instances A (size 4, TP 3) and B (size 12, TP 6), in different images.
    #   split average size = (4 + 12) / 2 = 8 -> w_A = 2, w_B = 2/3
    #   wTP = 2*3 + (2/3)*6 = 10, wFN = 2*1 + (2/3)*6 = 6
    #   FP = 2 bg pixels + 1 class-2 pixel predicted 1 = 3 (the ignored pixel predicted 1 does not count)
    #   iIoU_1 = 10 / (10 + 6 + 3) = 10/19   (plain IoU would be 9/19)
    # class 2: one instance C (size 5, TP 4): w = 1, wTP = 4, wFN = 1, FP = 6 (B pixels predicted 2)
    #   iIoU_2 = 4 / (4 + 1 + 6) = 4/11
    pred, target, inst = _iiou_hand()
    ii = InstanceIoU(3)
    ii.update(pred, target, inst)
    m = ii.compute()
    assert m["iiou_per_class"][0] is None
    assert m["iiou_per_class"][1:] == pytest.approx([10 / 19, 4 / 11], abs=1e-12)
    assert m["iIoU"] == pytest.approx((10 / 19 + 4 / 11) / 2, abs=1e-12)
    # the average size is over the split: image by image, A alone would get weight 1
    assert InstanceIoU.sample_stats(pred, target, inst, 3).shape == (2, 4 * 3)
    assert "iIoU" in str(ii)


def _iiou_reference(pred: np.ndarray, target: np.ndarray, inst: np.ndarray, k: int) -> list:
    """Slow reference: python loops over images and instances."""
    sizes, tps = {c: [] for c in range(1, k)}, {c: [] for c in range(1, k)}
    fp = {c: 0 for c in range(1, k)}
    for p, t, ins in zip(pred, target, inst):
        for c in range(1, k):
            fp[c] += int(((p == c) & (t != c) & (t != 255)).sum())
            for i in np.unique(ins[t == c]):
                if i in (0, 255):
                    continue
                mask = (ins == i) & (t == c)
                sizes[c].append(int(mask.sum()))
                tps[c].append(int((p[mask] == c).sum()))
    out = [None]
    for c in range(1, k):
        if not sizes[c]:
            out.append(None)
            continue
        avg = sum(sizes[c]) / len(sizes[c])
        wtp = sum(avg / s * tp for s, tp in zip(sizes[c], tps[c]))
        wfn = sum(avg / s * (s - tp) for s, tp in zip(sizes[c], tps[c]))
        out.append(wtp / (wtp + wfn + fp[c]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iiou_matches_slow_reference(seed):
    k = 5
    pred, target, inst = _blobs(seed, b=6, k=k)
    ii = InstanceIoU(k)
    ii.update(pred, target, inst)
    got = ii.compute()["iiou_per_class"]
    ref = _iiou_reference(pred.numpy(), target.numpy(), inst.numpy(), k)
    assert [g is None for g in got] == [r is None for r in ref]
    assert sum(r is not None for r in ref) >= 2
    assert [g for g in got if g is not None] == pytest.approx([r for r in ref if r is not None], abs=1e-12)


def test_iiou_halves_equal_all_at_once():
    k = 5
    pred, target, inst = _blobs(7, b=6, k=k)
    stats = InstanceIoU.sample_stats(pred, target, inst, k)
    assert stats.dtype == torch.float64 and stats.shape == (6, 4 * k)
    whole, halves = InstanceIoU(k), InstanceIoU(k)
    whole.update(stats=stats)
    halves.update(stats=InstanceIoU.sample_stats(pred[:3], target[:3], inst[:3], k))
    halves.update(stats=InstanceIoU.sample_stats(pred[3:], target[3:], inst[3:], k))
    assert whole.compute()["iIoU"] == pytest.approx(halves.compute()["iIoU"], abs=1e-12)
    direct = InstanceIoU(k)
    direct.update(pred, target, inst)
    assert torch.equal(direct.total, whole.total)


# ---------------------------------------------------------------- depth


def test_depth_mse_hand_and_nan_excluded():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[1.0, 1.0], [1.0, float("nan")]]])
    dm = DepthMetrics()
    dm.update(pred, target)
    m = dm.compute()
    assert m["depth_mse"] == pytest.approx((0 + 1 + 4) / 3)
    assert m["depth_rmse"] == pytest.approx(math.sqrt(5 / 3))
    # an explicit mask removes more pixels; (B, 1, H, W) predictions are accepted
    dm.reset()
    dm.update(pred.unsqueeze(1), target, valid=torch.tensor([[[True, False], [True, True]]]))
    assert dm.compute()["depth_mse"] == pytest.approx((0 + 4) / 2)


def test_depth_alignment_per_image():
    g = torch.Generator().manual_seed(0)
    target = 0.05 + 0.95 * torch.rand(2, 8, 8, generator=g, dtype=torch.float64)  # float64: exact up to rounding
    target[0, 0, :3] = float("nan")
    # a different scale and shift per image: a single global alignment could not undo both
    pred = torch.stack([2.0 * target[0] + 0.5, -0.3 * target[1] + 4.0])
    dm = DepthMetrics()
    dm.update(pred, target)
    m = dm.compute()
    assert m["depth_absrel"] == pytest.approx(0.0, abs=1e-9)
    assert m["depth_delta1"] == 1.0
    assert m["depth_mse"] > 1.0  # the raw errors are not aligned
    assert not math.isnan(m["depth_mse"])


def test_depth_constant_prediction_and_far_floor():
    # constant prediction: only the shift is fitted, aligned = mean(t) = 0.75
    # AbsRel = (0.25/0.5 + 0.25/1.0) / 2 = 0.375; ratios 1.5 and 1.33 both miss delta < 1.25
    pred = torch.full((1, 1, 2), 3.0)
    target = torch.tensor([[[0.5, 1.0]]])
    dm = DepthMetrics()
    dm.update(pred, target)
    m = dm.compute()
    assert m["depth_absrel"] == pytest.approx(0.375)
    assert m["depth_delta1"] == 0.0
    # a target below the 1e-3 floor counts for MSE but not for the ratio metrics
    stats = DepthMetrics.sample_stats(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[0.1, 0.2, 0.0005]]]))
    n, _, n_ratio, _, _ = stats[0].tolist()
    assert (n, n_ratio) == (3.0, 2.0)


def test_depth_stats_split_equal_all_at_once():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(4, 6, 6, generator=g)
    target[target < 0.1] = float("nan")
    pred = target.nan_to_num(0.5) * 1.5 + 0.2 * torch.randn(4, 6, 6, generator=g)
    whole, parts = DepthMetrics(), DepthMetrics()
    whole.update(pred, target)
    for i in range(4):
        parts.update(stats=DepthMetrics.sample_stats(pred[i : i + 1], target[i : i + 1]))
    a, b = whole.compute(), parts.compute()
    assert a == pytest.approx(b, abs=1e-12)
    assert 0.0 < a["depth_absrel"] < 1.0 and 0.0 < a["depth_delta1"] < 1.0


def test_depth_nan_reason_names_the_cause_and_leaves_values():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])
    zeros = DepthMetrics()  # the all-zero maps make_depth stores for a constant prediction
    zeros.update(pred, torch.zeros(1, 2, 2))
    m = zeros.compute()
    assert m["depth_mse"] == pytest.approx((1 + 4 + 9 + 25) / 4)
    assert math.isnan(m["depth_absrel"]) and math.isnan(m["depth_delta1"])
    assert zeros.nan_reason().startswith("depth_absrel, depth_delta1: NaN because no pseudo depth target pixel is "
                                         "above 0.001 (every map is 0 = farthest everywhere")
    assert str(zeros).endswith(f"({zeros.nan_reason()})")
    invalid = DepthMetrics()
    invalid.update(pred, torch.full((1, 2, 2), float("nan")))
    assert all(math.isnan(v) for v in invalid.compute().values())
    assert invalid.nan_reason() == ("depth metrics: NaN because every pseudo depth target pixel is invalid "
                                    "(NaN or padding)")
    assert DepthMetrics().nan_reason() == invalid.nan_reason()  # nothing seen at all
    fine = DepthMetrics()
    fine.update(pred, torch.tensor([[[0.5, 0.0], [1.0, 0.25]]]))
    assert fine.nan_reason() is None and "NaN" not in str(fine)
