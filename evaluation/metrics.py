"""Split-level segmentation and depth metrics: confusion matrix (mIoU), instance-weighted IoU, depth errors.

Every metric accumulates fixed-size per-sample rows so that, under Accelerate,
``accelerator.gather_for_metrics(rows)`` can drop the duplicated samples that
pad the last batch of distributed evaluation:

    counts = ConfusionMatrix.batch_counts(pred, label, K)   # (B, K*K) on device
    cm.update(counts=accelerator.gather_for_metrics(counts))

``SegEvaluator`` does this for all three from a model's outputs; train.py and tools/evaluate.py use it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from data.voc import IGNORE_INDEX
DEPTH_EPS = 1e-3  # targets are inverse depth in 0..1: below this a pixel is "at infinity" and ratios blow up
DELTA1 = 1.25


def _as_batch(x: Tensor) -> Tensor:
    """(H, W) -> (1, H, W); (B, 1, H, W) -> (B, H, W); (B, H, W) unchanged."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected (B, H, W), (B, 1, H, W) or (H, W), got shape {tuple(x.shape)}")
    return x


def _check_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Batch both maps and check that their shapes agree."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return pred, target


def _mean(values: Sequence[float]) -> float:
    """Mean of a list, NaN when it is empty."""
    return sum(values) / len(values) if values else math.nan


class ConfusionMatrix:
    """Whole-split confusion matrix (rows = ground truth, cols = prediction), 255 ignored."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.mat: Tensor | None = None  # (K, K) int64, on the device of the first update

    @staticmethod
    def batch_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """Per-sample confusion counts, shape (B, K*K) int64, from pred/target (B,H,W) int."""
        pred, target = _check_pair(pred, target)
        b, k = pred.shape[0], num_classes
        pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()  # (B, HW)
        keep = (target != ignore_index) & (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
        sample = torch.arange(b, device=pred.device).unsqueeze(1)  # (B, 1)
        # one bincount for the whole batch: bin = sample * K*K + gt * K + pred; dropped pixels go to a spare last bin
        idx = torch.where(keep, sample * k * k + target * k + pred, b * k * k)
        return torch.bincount(idx.flatten(), minlength=b * k * k + 1)[: b * k * k].view(b, k * k)

    def update(self, pred: Tensor | None = None, target: Tensor | None = None, *, counts: Tensor | None = None) -> None:
        """Add a batch: either pred/target, or per-sample counts already gathered (B, K*K) (summed)."""
        if counts is None:
            if pred is None or target is None:
                raise ValueError("update needs pred and target, or counts")
            counts = self.batch_counts(pred, target, self.num_classes, self.ignore_index)
        k = self.num_classes
        if counts.shape[-1] != k * k:
            raise ValueError(f"counts have {counts.shape[-1]} columns, expected K*K = {k * k}")
        total = counts.reshape(-1, k * k).sum(0).view(k, k).long()  # (K, K)
        self.mat = total if self.mat is None else self.mat + total.to(self.mat.device)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.mat = None

    @staticmethod
    def sample_miou(counts: Tensor, num_classes: int) -> Tensor:
        """Per-image mIoU (N,) float64 from per-sample counts (N, K*K), over the classes present in that image's
        label or prediction; NaN for an image with no labelled pixel."""
        h = counts.reshape(-1, num_classes, num_classes).double()  # (N, K, K)
        tp = h.diagonal(dim1=1, dim2=2)  # (N, K)
        union = h.sum(2) + h.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), 0.0)
        return iou.sum(1) / present.sum(1)  # 0 / 0 = NaN when nothing is present

    def compute(self) -> dict:
        """Split metrics as python floats in 0..1; classes absent from label and prediction are left out of means."""
        k = self.num_classes
        h = torch.zeros(k, k, dtype=torch.float64) if self.mat is None else self.mat.detach().cpu().double()
        tp, gt, pr = h.diag(), h.sum(1), h.sum(0)  # (K,) each
        union = gt + pr - tp
        iou = [(tp[c] / union[c]).item() if union[c] > 0 else None for c in range(k)]
        acc = [(tp[c] / gt[c]).item() if gt[c] > 0 else None for c in range(k)]
        labelled = h.sum().item()
        return {
            "mIoU": _mean([v for v in iou if v is not None]),
            "fg_mIoU": _mean([v for v in iou[1:] if v is not None]),
            "pixel_acc": tp.sum().item() / labelled if labelled > 0 else math.nan,
            "mean_acc": _mean([v for v in acc if v is not None]),
            "iou": iou,
            "absent_classes": [c for c in range(k) if iou[c] is None],
        }

    def __str__(self) -> str:
        """A readable table: per-class IoU, then the overall numbers."""
        m = self.compute()
        width = max(len(n) for n in self.class_names + ["class"])
        lines = [f"{'class':<{width}}  IoU"]
        for name, v in zip(self.class_names, m["iou"]):
            lines.append(f"{name:<{width}}  " + ("absent" if v is None else f"{100 * v:6.2f}"))
        lines.append(
            f"mIoU {100 * m['mIoU']:.2f}  fg_mIoU {100 * m['fg_mIoU']:.2f}  "
            f"pixel_acc {100 * m['pixel_acc']:.2f}  mean_acc {100 * m['mean_acc']:.2f}"
        )
        if m["absent_classes"]:
            lines.append(f"absent from label and prediction (left out of the means): {m['absent_classes']}")
        return "\n".join(lines)


class InstanceIoU:
    """Cityscapes-style instance-weighted IoU (iIoU) over foreground classes, from SegmentationObject instance maps.

    For foreground class c with ground-truth instances i (pixels with instance id i AND label c; ids 0 and
    255 are not instances), size s_i, true positives TP_i (pixels predicted c) and FN_i = s_i - TP_i:
        w_i = avg_c / s_i,  avg_c = S_c / N_c  (S_c total size, N_c number of instances of c over the WHOLE split)
        wTP_c = sum_i w_i TP_i = avg_c * sum_i TP_i / s_i
        wFN_c = sum_i w_i FN_i = avg_c * (N_c - sum_i TP_i / s_i)   (so wTP_c + wFN_c = S_c)
        FP_c  = pixels predicted c whose label is another class (255 excluded), unweighted
        iIoU_c = wTP_c / (wTP_c + wFN_c + FP_c), undefined (None) when the denominator is 0: a class with no
        instance that is never wrongly predicted; one with no instance but false positives scores 0.
        iIoU = mean over the instance classes where it is defined, as Cityscapes' evalPixelLevelSemanticLabeling.
    `classes`: the instance classes (default every foreground class, VOC); `avg_size`: fixed avg_c per class in
    place of the split's own (Cityscapes' script weights by its train-set table, data/cityscapes.py).
    avg_c is only known at the end, so each sample keeps the split-additive sums S_c, N_c, sum_i TP_i/s_i
    and FP_c: a (B, 4*K) float64 row, layout [size_sum | n_instances | tp_frac_sum | fp], K columns each.
    """

    STATS = 4

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, classes: Sequence[int] | None = None,
                 avg_size: Mapping[int, float] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.classes = tuple(classes) if classes is not None else tuple(range(1, num_classes))
        self.avg_size = dict(avg_size) if avg_size is not None else None
        if self.avg_size is not None and set(self.avg_size) != set(self.classes):
            raise ValueError(f"avg_size must give every instance class {self.classes}, got {sorted(self.avg_size)}")
        self.total: Tensor | None = None  # (4, K) float64

    @staticmethod
    def sample_stats(
        pred: Tensor, target: Tensor, instances: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
    ) -> Tensor:
        """Per-sample stats as a fixed-size (B, S) float64 tensor so it can go through gather_for_metrics."""
        pred, target = _check_pair(pred, target)
        instances = _as_batch(instances)
        if instances.shape != target.shape:
            raise ValueError(f"instance map {tuple(instances.shape)} and target {tuple(target.shape)} differ in shape")
        b, k, dev = target.shape[0], num_classes, target.device
        pred, target, inst = (x.reshape(b, -1).long() for x in (pred, target, instances))  # (B, HW)
        sample = torch.arange(b, device=dev).unsqueeze(1).expand_as(target)  # (B, HW)
        stats = torch.zeros(InstanceIoU.STATS, b * k, dtype=torch.float64, device=dev)

        # instances: unique (sample, class, id) triples over foreground pixels with a real instance id
        in_inst = (target > 0) & (target < k) & (inst != 0) & (inst != ignore_index)
        span = inst.max().clamp(min=0) + 1  # a tensor: no host sync needed to build the key
        key = ((sample * k + target) * span + inst)[in_inst]  # (P,)
        uniq, which, size = torch.unique(key, return_inverse=True, return_counts=True)  # (I,), (P,), (I,)
        hit = (pred[in_inst] == target[in_inst]).double()  # (P,)
        tp = torch.zeros(uniq.numel(), dtype=torch.float64, device=dev).index_add_(0, which, hit)  # (I,)
        slot = uniq // span  # (I,) = sample * K + class
        stats[0].index_add_(0, slot, size.double())
        stats[1].index_add_(0, slot, torch.ones_like(tp))
        stats[2].index_add_(0, slot, tp / size.double())

        # false positives: predicted c, labelled another (non-ignored) class
        wrong = (pred != target) & (target != ignore_index) & (pred >= 0) & (pred < k)  # (B, HW)
        stats[3].index_add_(0, (sample * k + pred.clamp(0, k - 1)).flatten(), wrong.flatten().double())
        return stats.view(InstanceIoU.STATS, b, k).permute(1, 0, 2).reshape(b, InstanceIoU.STATS * k)

    def update(
        self,
        pred: Tensor | None = None,
        target: Tensor | None = None,
        instances: Tensor | None = None,
        *,
        stats: Tensor | None = None,
    ) -> None:
        """Add a batch: either pred/target/instances, or per-sample stats already gathered (B, 4*K) (summed)."""
        if stats is None:
            if pred is None or target is None or instances is None:
                raise ValueError("update needs pred, target and instances, or stats")
            stats = self.sample_stats(pred, target, instances, self.num_classes, self.ignore_index)
        total = stats.reshape(-1, self.STATS, self.num_classes).double().sum(0)  # (4, K)
        self.total = total if self.total is None else self.total + total.to(self.total.device)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.total = None

    def compute(self) -> dict:
        """iIoU (mean over the instance classes where it is defined) and per-class values (None: undefined, or
        not an instance class)."""
        k = self.num_classes
        t = torch.zeros(self.STATS, k, dtype=torch.float64) if self.total is None else self.total.detach().cpu()
        size_sum, count, tp_frac, fp = t.tolist()
        per_class: list[float | None] = [None] * k
        for c in self.classes:
            if self.avg_size is not None:
                avg = self.avg_size[c]
            else:
                avg = size_sum[c] / count[c] if count[c] else 0.0  # no instance: no weighted TP or FN either
            wtp, wfn = avg * tp_frac[c], avg * (count[c] - tp_frac[c])
            denom = wtp + wfn + fp[c]
            per_class[c] = wtp / denom if denom > 0 else None
        return {"iIoU": _mean([v for v in per_class if v is not None]), "iiou_per_class": per_class}

    def __str__(self) -> str:
        """One line: iIoU over the classes that have instances."""
        m = self.compute()
        return f"iIoU {100 * m['iIoU']:.2f} over {sum(v is not None for v in m['iiou_per_class'])} classes"


class DepthMetrics:
    """Depth metrics against pseudo depth over valid pixels (NaN / invalid excluded).

    MSE / RMSE compare the raw prediction with the target over all valid pixels of the split. AbsRel and
    delta < 1.25 first align the prediction per image by least-squares scale and shift (a*p + b fitted on
    that image's valid pixels), then average over valid pixels with target > DEPTH_EPS: targets are inverse
    depth normalised to 0..1, so t near 0 is "far" and t / aligned is meaningless there. An aligned value
    <= 0 is a delta miss. Per-sample row (B, 5) float64: [n_valid, sum_sq_err, n_ratio, sum_absrel, n_delta1].
    """

    STATS = 5

    def __init__(self):
        self.total: Tensor | None = None  # (5,) float64

    @staticmethod
    def sample_stats(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        """Per-sample sums, shape (B, 5) float64; valid defaults to isfinite(target) and is always ANDed with it."""
        pred, target = _check_pair(pred, target)
        b = target.shape[0]
        p, t = pred.reshape(b, -1).double(), target.reshape(b, -1).double()  # (B, HW)
        m = torch.isfinite(t)
        if valid is not None:
            m = m & _as_batch(valid).reshape(b, -1).bool()
        # zero the invalid pixels so NaN targets cannot leak into sums through 0 * NaN
        p, t, mf = torch.where(m, p, 0.0), torch.where(m, t, 0.0), m.double()
        n = mf.sum(1)  # (B,)
        sse = ((p - t) ** 2 * mf).sum(1)

        # normal equations of min_ab sum (a p + b - t)^2: [[Spp, Sp], [Sp, n]] [a, b] = [Spt, St]
        sp, spp, st, spt = p.sum(1), (p * p).sum(1), t.sum(1), (p * t).sum(1)
        det = n * spp - sp * sp
        flat = det <= 1e-12 * (n * spp).clamp(min=1e-300)  # constant prediction or < 2 pixels: shift only
        safe = torch.where(flat, torch.ones_like(det), det)
        a = torch.where(flat, torch.zeros_like(det), (n * spt - sp * st) / safe)
        b0 = torch.where(flat, st / n.clamp(min=1), (spp * st - sp * spt) / safe)
        aligned = a.unsqueeze(1) * p + b0.unsqueeze(1)  # (B, HW)

        r = m & (t > DEPTH_EPS)
        rf, tr = r.double(), torch.where(r, t, 1.0)
        absrel = ((aligned - tr).abs() / tr * rf).sum(1)
        pos = aligned > 0
        ratio = torch.maximum(aligned / tr, tr / torch.where(pos, aligned, 1.0))
        hits = (r & pos & (ratio < DELTA1)).double().sum(1)
        return torch.stack([n, sse, rf.sum(1), absrel, hits], dim=1)  # (B, 5)

    def update(
        self, pred: Tensor | None = None, target: Tensor | None = None, valid: Tensor | None = None, *,
        stats: Tensor | None = None,
    ) -> None:
        """Add a batch: either pred/target(/valid), or per-sample stats already gathered (B, 5) (summed)."""
        if stats is None:
            if pred is None or target is None:
                raise ValueError("update needs pred and target, or stats")
            stats = self.sample_stats(pred, target, valid)
        total = stats.reshape(-1, self.STATS).double().sum(0)  # (5,)
        self.total = total if self.total is None else self.total + total.to(self.total.device)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.total = None

    def compute(self) -> dict:
        """Pixel-weighted split averages as python floats (NaN when no valid pixel was seen)."""
        t = torch.zeros(self.STATS, dtype=torch.float64) if self.total is None else self.total.detach().cpu()
        n, sse, n_ratio, absrel, hits = t.tolist()
        mse = sse / n if n > 0 else math.nan
        return {
            "depth_mse": mse,
            "depth_rmse": math.sqrt(mse) if n > 0 else math.nan,
            "depth_absrel": absrel / n_ratio if n_ratio > 0 else math.nan,
            "depth_delta1": hits / n_ratio if n_ratio > 0 else math.nan,
        }

    def nan_reason(self) -> str | None:
        """Why compute() gives NaN depth metrics (None when it does not): no valid target, or none above DEPTH_EPS."""
        n, _, n_ratio, _, _ = ([0.0] * self.STATS if self.total is None else self.total.tolist())
        if n == 0:
            return "depth metrics: NaN because every pseudo depth target pixel is invalid (NaN or padding)"
        if n_ratio == 0:
            return (f"depth_absrel, depth_delta1: NaN because no pseudo depth target pixel is above {DEPTH_EPS} "
                    "(every map is 0 = farthest everywhere, as tools/make_depth.py stores a constant prediction); "
                    "remake the maps with another depth model")
        return None

    def __str__(self) -> str:
        """One line of depth numbers, and why some are NaN."""
        reason = self.nan_reason()
        return "  ".join(f"{k} {v:.4f}" for k, v in self.compute().items()) + (f"  ({reason})" if reason else "")


class SegEvaluator:
    """Split metrics from model outputs: confusion matrix, iIoU when batches carry instances, depth when both the
    outputs and the batch have it. Shared by train.py's validation and tools/evaluate.py.

    Each update turns the batch into fixed-size per-sample rows and reduces them through
    ``accelerator.gather_for_metrics``, so the duplicates that pad the last batch of a distributed split are
    dropped and every sample counts once; without an accelerator the rows are used as they are.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
                 instance_classes: Sequence[int] | None = None, avg_instance_size: Mapping[int, float] | None = None):
        self.num_classes = num_classes
        self.confmat = ConfusionMatrix(num_classes, class_names=class_names)
        self.iiou = InstanceIoU(num_classes, classes=instance_classes, avg_size=avg_instance_size)
        self.depth = DepthMetrics()
        self.has_instances = self.has_depth = False

    def update(self, outputs: dict, batch: dict, accelerator=None) -> Tensor:
        """Add a batch (outputs["seg"] logits or probabilities (B, K, H, W)); returns the gathered confusion rows (N, K*K)."""
        gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
        k = self.num_classes
        pred = outputs["seg"].argmax(1)  # (B, H, W)
        counts = gather(ConfusionMatrix.batch_counts(pred, batch["label"], k))
        self.confmat.update(counts=counts)
        if "instances" in batch:
            self.has_instances = True
            self.iiou.update(stats=gather(InstanceIoU.sample_stats(pred, batch["label"], batch["instances"], k)))
        if "depth" in outputs and "depth" in batch:
            self.has_depth = True
            self.depth.update(stats=gather(DepthMetrics.sample_stats(outputs["depth"].float(), batch["depth"])))
        return counts

    def compute(self) -> dict:
        """mIoU, fg_mIoU, pixel_acc, mean_acc, iou, absent_classes, confusion_matrix (nested list), iIoU and
        depth metrics when they were measured, depth_nan_reason (text) when depth metrics are NaN."""
        k = self.num_classes
        mat = self.confmat.mat.cpu() if self.confmat.mat is not None else torch.zeros(k, k, dtype=torch.int64)
        metrics = {**self.confmat.compute(), "confusion_matrix": mat.tolist()}
        if self.has_instances:
            metrics.update(self.iiou.compute())
        if self.has_depth:
            metrics.update(self.depth.compute())
            if reason := self.depth.nan_reason():
                metrics["depth_nan_reason"] = reason
        return metrics
