"""One optimizer step, shared by every trainer (pretraining, mid-training, SFT, the RL learner).

The step takes `grad_accum_steps` micro-batches, sets this step's learning-rate and Muon-momentum
schedules, and lets the backend (plain torch or DeepSpeed, see backend.py) run forward and backward on
each micro-batch and then update every parameter once.

The loss of a step is the sum of its token losses divided by N, by default the number of supervised
tokens (target != -1) in all its micro-batches on all ranks (a stage may count N otherwise: RL's Dr. GRPO
divides by a constant per reply). Each micro-batch backpropagates
sum(its token losses) x world / N; once the ranks average their gradients that is exactly the gradient
of one big batch, however the step is split into micro-batches and ranks. A micro-batch without a
supervised token contributes exactly nothing (a sum over no tokens is 0, never 0/0). A step without any
supervised token is skipped: an optimizer step with zero gradients would still move the weights
(AdamW and Muon momentum).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from raychat.optim import lr_multiplier, muon_momentum


@dataclass
class Batch:
    """One micro-batch: token ids, next-token targets (-1 = no loss at that position), optional per-token
    loss weights (RL advantages), and for RL's clipped and KL-penalised losses the log-probabilities of the
    targets under the weights that sampled them (`old_logprobs`) and under the reference policy."""
    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.inputs), move(self.targets), move(self.weights), move(self.old_logprobs),
                     move(self.ref_logprobs))

    @classmethod
    def of(cls, item) -> "Batch":
        """A Batch from what a data stream yields: a Batch, or an (inputs, targets) pair."""
        return item if isinstance(item, Batch) else cls(*item)


def pad_rows(rows: list[list], fill: float, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows of different lengths as one (len(rows), longest) tensor, padded on the right with `fill`
    (causal attention: padding after a row's tokens changes nothing before it)."""
    out = torch.full((len(rows), max(len(row) for row in rows)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def token_loss_sum(model: Callable, batch: Batch) -> torch.Tensor:
    """The default loss: the sum of the (weighted) cross-entropies of the batch's supervised tokens.
    A stage's loss function has this signature: `model` is the callable the backend trains (compiled,
    or the DeepSpeed engine); the result is a sum over tokens, normalised by `train_step`."""
    return model(batch.inputs, batch.targets, loss_reduction="sum", weights=batch.weights)


@dataclass
class Schedule:
    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    initial_lr_frac: float = 1.0   # SFT / RL start from a fraction of the pretraining learning rates

    def lr_mult(self, step: int) -> float:
        return self.initial_lr_frac * lr_multiplier(step, self.num_iterations, self.warmup_ratio,
                                                    self.warmdown_ratio, self.final_lr_frac)


@dataclass
class StepResult:
    loss: float          # sum of token losses / the normaliser (default: per supervised token); nan when skipped
    grad_norm: float     # global gradient norm before clipping (nan when skipped)
    lr_mult: float
    momentum: float
    tokens: int          # tokens processed in the step (inputs of every micro-batch), all ranks: for tok/s and MFU
    supervised: int      # of which with a target (the loss normaliser), all ranks
    seconds: float
    skipped: bool = False


def supervised_tokens(batches: list[Batch]) -> int:
    """The default loss normaliser of a rank's micro-batches: their tokens with a target."""
    return sum(int((b.targets >= 0).sum()) for b in batches)


def train_step(backend, batches: Iterator, step: int, schedule: Schedule, grad_accum_steps: int,
               loss_fn: Callable[[Callable, Batch], torch.Tensor] = token_loss_sum,
               normalizer: Callable[[list[Batch]], float] = supervised_tokens) -> StepResult:
    """Run optimizer step number `step` (0-based) on `grad_accum_steps` micro-batches from `batches`;
    the loss is divided by the sum over ranks of `normalizer(this rank's micro-batches)`."""
    t0 = time.perf_counter()
    lr_mult, momentum = schedule.lr_mult(step), muon_momentum(step)
    backend.set_hyperparameters(lr_mult, momentum)
    micro_batches = [Batch.of(next(batches)) for _ in range(grad_accum_steps)]
    # counted on the host before the batches move: the normaliser must be known before the first backward
    local = supervised_tokens(micro_batches)
    total, processed, norm = backend.all_reduce_sum([local, sum(b.inputs.numel() for b in micro_batches),
                                                     normalizer(micro_batches)])
    if total == 0:
        return StepResult(math.nan, math.nan, lr_mult, momentum, int(processed), 0, time.perf_counter() - t0,
                          skipped=True)
    scale = backend.world / norm
    loss_sum = torch.zeros((), dtype=torch.float32, device=backend.device)  # one host sync per step, at the end
    for batch in micro_batches:
        loss_sum += backend.forward_backward(batch.to(backend.device), loss_fn, scale).float()
    grad_norm = backend.optimizer_step()
    (loss_total,) = backend.all_reduce_sum([loss_sum])
    return StepResult(loss=loss_total / norm, grad_norm=grad_norm, lr_mult=lr_mult, momentum=momentum,
                      tokens=int(processed), supervised=int(total), seconds=time.perf_counter() - t0)
