"""One optimizer step, shared by every trainer (pretraining now; mid-training, SFT and the RL learner later).

The step pulls `grad_accum_steps` micro-batches, sets the learning-rate and Muon-momentum schedules for
this step, and lets the backend (plain torch or DeepSpeed, see backend.py) do forward, backward and the
update. It returns the mean loss over the micro-batches and all ranks, and the gradient norm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from raychat.optim import lr_multiplier, muon_momentum


@dataclass
class Schedule:
    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0

    def lr_mult(self, step: int) -> float:
        return lr_multiplier(step, self.num_iterations, self.warmup_ratio, self.warmdown_ratio, self.final_lr_frac)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr_mult: float
    momentum: float
    tokens: int          # tokens processed by all ranks in this step
    seconds: float


def train_step(backend, batches: Iterator, step: int, schedule: Schedule, grad_accum_steps: int) -> StepResult:
    """Run optimizer step number `step` (0-based): accumulate gradients over `grad_accum_steps`
    micro-batches from `batches`, then update every parameter once."""
    t0 = time.perf_counter()
    lr_mult, momentum = schedule.lr_mult(step), muon_momentum(step)
    backend.set_hyperparameters(lr_mult, momentum)
    loss_sum = None  # stays on the device: one host sync per step, not per micro-batch
    tokens = 0  # supervised tokens (targets >= 0); a device tensor after the first micro-batch
    for micro in range(grad_accum_steps):
        inputs, targets = next(batches)
        loss = backend.forward_backward(inputs, targets, grad_accum_steps, last=micro == grad_accum_steps - 1)
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        tokens = tokens + (targets >= 0).sum()
    grad_norm = backend.last_grad_norm()
    mean_loss, tokens = backend.all_reduce_mean_and_sum(loss_sum.item() / grad_accum_steps, int(tokens))
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lr_mult=lr_mult, momentum=momentum, tokens=tokens,
                      seconds=time.perf_counter() - t0)
