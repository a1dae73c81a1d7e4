"""Loss weighting for the joint ("b") stage beyond the paper's fixed 0.85 / 0.15.

`--joint-weighting paper` keeps the stage's fixed weights (no object here). The other two replace them:

- `uncertainty` (Kendall, Gal & Cipolla, CVPR 2018): one learnable s_t = log(sigma_t^2) per task,
  L = sum_t c_t * exp(-s_t) * L_t + 0.5 * s_t, with c_t = 1 for classification (seg, their eq. 10:
  1/sigma^2 * L + log sigma) and c_t = 0.5 for regression (depth, their eq. 7: 1/(2 sigma^2) * L + log sigma).
  The common shorthand exp(-s) * L + s differs only in the regulariser's factor; we keep the paper's.
- `dwa` (Liu, Johns & Davison, CVPR 2019): w_t(k) = K * softmax_t(r_t(k-1) / T),
  r_t(k-1) = L_t(k-1) / L_t(k-2), from the per-epoch average of each task's raw loss; the first two
  epochs of the joint stage use w_t = 1.

Both are nn.Modules so that `to(device)` and `state_dict` work alike; only the uncertainty one has parameters
(optimised in the joint stage, all-reduced across processes by preparing it with Accelerate: see `for_stage`).
A checkpoint holds its state once: in Accelerate's save_state (model_1.safetensors) while it is prepared, else
as weighting.pt (run_state.save_checkpoint). It is not part of the model, so config.json, model.safetensors,
export and `load_model` do not change.
"""
import math

import torch
from torch import Tensor, nn

CLASSIFICATION_TASKS = frozenset({"seg"})  # everything else is a regression (depth: MSE)
WEIGHTINGS = ("paper", "uncertainty", "dwa")


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting with one learnable log-variance per task."""

    def __init__(self, tasks: tuple[str, ...]):
        super().__init__()
        self.tasks = tuple(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # s_t = log sigma_t^2; 0: sigma_t = 1
        scale = [1.0 if t in CLASSIFICATION_TASKS else 0.5 for t in self.tasks]
        self.register_buffer("scale", torch.tensor(scale), persistent=False)  # c_t

    def forward(self, terms: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for i, t in enumerate(self.tasks):
            s = self.log_vars[i]
            total = total + self.scale[i] * torch.exp(-s) * terms[t] + 0.5 * s
        return total

    def weights(self) -> dict[str, Tensor]:
        """The effective factor in front of each raw loss (detached; no host sync)."""
        w = (self.scale * torch.exp(-self.log_vars)).detach()
        return {t: w[i] for i, t in enumerate(self.tasks)}

    def epoch_end(self, losses: dict[str, float]) -> None:
        """Nothing to do: the weights are learned step by step."""


class DynamicWeightAverage(nn.Module):
    """DWA: weights from the relative descent rate of each task's loss over the last two epochs."""

    def __init__(self, tasks: tuple[str, ...], temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be positive, got {temperature}")
        self.tasks = tuple(tasks)
        self.temperature = temperature
        self.history: list[dict[str, float]] = []  # per-epoch average raw losses, the last two kept

    def current(self) -> dict[str, float]:
        """w_t for the coming epoch: 1 each until two epochs of losses are known."""
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        prev2, prev = self.history
        rates = [prev[t] / max(prev2[t], 1e-12) for t in self.tasks]
        top = max(r / self.temperature for r in rates)  # shift before exp: a stable softmax
        exps = [math.exp(r / self.temperature - top) for r in rates]
        return {t: len(self.tasks) * e / sum(exps) for t, e in zip(self.tasks, exps)}

    def forward(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.current()
        return sum(w[t] * terms[t] for t in self.tasks)

    def weights(self) -> dict[str, Tensor]:
        return {t: torch.tensor(w) for t, w in self.current().items()}

    def epoch_end(self, losses: dict[str, float]) -> None:
        """Record the epoch's average raw losses (already averaged over processes, so every rank agrees)."""
        self.history = [*self.history, {t: float(losses[t]) for t in self.tasks}][-2:]

    def get_extra_state(self) -> dict:
        return {"history": self.history}

    def set_extra_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]


def build_weighting(kind: str, tasks: tuple[str, ...], temperature: float = 2.0) -> nn.Module | None:
    """The joint-stage weighting for `--joint-weighting`; None for the paper's fixed weights or a one-decoder model."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown joint weighting {kind!r}; choose from {', '.join(WEIGHTINGS)}")
    if kind == "paper" or len(tasks) < 2:
        return None
    return UncertaintyWeighting(tasks) if kind == "uncertainty" else DynamicWeightAverage(tasks, temperature)


def trainable_params(weighting: nn.Module | None, stage_tasks: tuple[str, ...]) -> list[nn.Parameter]:
    """Parameters the weighting adds to the optimizer in this stage (only joint stages use a weighting)."""
    if weighting is None or len(stage_tasks) < 2:
        return []
    return [p for p in weighting.parameters() if p.requires_grad]


def for_stage(weighting: nn.Module | None, stage_tasks: tuple[str, ...], accelerator) -> nn.Module | None:
    """The weighting this stage uses: None outside joint stages; a learnable one is prepared (DDP all-reduces its
    gradients; save_state writes it as model_1.safetensors after the model's model.safetensors)."""
    if weighting is None or len(stage_tasks) < 2:
        return None
    return accelerator.prepare(weighting) if trainable_params(weighting, stage_tasks) else weighting
