"""Stop on a non-finite loss without a host sync per step: the first bad step is remembered on the device and
checked when the loop logs or checkpoints, so a state a NaN reached is never checkpointed."""
import torch

from run_state.checkpoints import TrainState


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last checkpoint on disk is the last good state."""


class LossWatch:
    """Remembers on the device (no host sync per step) the first step whose loss or a loss term was not finite."""

    def __init__(self, terms: tuple[str, ...], device):
        self.names = (*terms, "loss")
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # its global step; -1: none so far
        self.values = torch.zeros(len(self.names), device=device)

    def update(self, terms: dict, loss: torch.Tensor, global_step: int) -> None:
        values = torch.stack([*(terms[t].detach().float() for t in self.names[:-1]), loss.detach().float()])
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, global_step, self.step)
        self.values = torch.where(first, values, self.values)

    def check(self, accelerator, state: TrainState, stage) -> None:
        """Raise on every process if any saw a non-finite loss (one gather), naming where and each term."""
        steps = accelerator.gather(self.step[None]).cpu()  # (processes,)
        if (steps < 0).all():
            return
        rank = int(torch.where(steps < 0, steps.max() + 1, steps).argmin())
        values = accelerator.gather(self.values[None]).cpu()[rank]
        bad = int(steps[rank])
        where = f", process {rank}" if accelerator.num_processes > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss at stage {state.stage} ({stage.name}), epoch {state.epoch}, step "
            f"{state.step - (state.global_step - bad)} of {state.steps_per_epoch} (global step {bad}{where}): "
            + ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, values.tolist()))
            + ". The last checkpoint on disk is the last good state; lower --lr or set --clip-grad-norm and resume."
        )
