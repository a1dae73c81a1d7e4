"""Softmax focal loss for segmentation and masked MSE for pseudo depth."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FocalLoss(nn.Module):
    """-(1 - p_t)^gamma * log(p_t), mean over non-ignored pixels; gamma=0 is cross entropy."""

    def __init__(self, gamma: float = 2.0, ignore_index: int = 255, alpha: Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer("alpha", alpha, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # logits (B, K, H, W), target (B, H, W); float32 for a stable log-softmax under autocast
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0).unsqueeze(-1)  # (B, H, W, 1)
        # classes last: for channels_last logits (the default) a view, so log-softmax and its backward copy nothing
        logp_t = F.log_softmax(logits.float().movedim(1, -1), dim=-1).gather(-1, safe).squeeze(-1)  # (B, H, W)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
        if self.alpha is not None:
            loss = loss * self.alpha[safe.squeeze(-1)]
        # clamp keeps an all-ignored batch at 0 instead of NaN, without a host sync
        return (loss * valid).sum() / valid.sum().clamp(min=1)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MSE over valid pixels; invalid (padding, missing) target pixels are NaN."""
    # pred (B, 1, H, W), target (B, 1, H, W)
    valid = torch.isfinite(target)
    diff = torch.where(valid, pred.float() - torch.nan_to_num(target), 0.0)
    return (diff**2).sum() / valid.sum().clamp(min=1)
