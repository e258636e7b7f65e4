"""The RL learner's loss when a batch is used for more than one update, or kept close to the SFT policy.

With one update per batch and no KL term the plain weighted cross-entropy of the shared step is the
policy gradient (advantage x -log p, summed over sampled tokens; train/step.py normalises). This loss is
used instead when `rl.ppo_epochs` > 1 or `rl.kl_coef` > 0. Per sampled token, with the log-probability
log p under the weights being trained and log q under the weights that sampled the reply:

    ratio  = exp(log p - log q)
    loss   = -min(ratio x A, clip(ratio, 1 - eps, 1 + eps) x A)                 (PPO's clipped surrogate)
           + beta x (exp(log r - log p) - (log r - log p) - 1)                   (KL to the reference r, k3)

At the first update of a batch ratio = 1, and the gradient is exactly the policy gradient above; later
updates of the same batch stop pushing a token once its ratio has left [1 - eps, 1 + eps] in the
advantage's direction. The KL estimator (k3) is non-negative and its gradient pulls log p towards the
reference policy's. Returns a sum over tokens, as every loss of the shared step.
"""
from __future__ import annotations

import torch

from raychat.train.step import Batch


def policy_loss(clip_eps: float, kl_coef: float):
    """The loss function (see the module docstring) for the shared training step."""

    def loss_fn(model, batch: Batch) -> torch.Tensor:
        supervised = batch.targets >= 0
        logp = -model(batch.inputs, batch.targets, loss_reduction="none").float()
        ratio = torch.exp(torch.where(supervised, logp - batch.old_logprobs, torch.zeros_like(logp)))
        advantage = batch.weights
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
        loss = -surrogate
        if kl_coef > 0:
            delta = torch.where(supervised, batch.ref_logprobs - logp, torch.zeros_like(logp))
            loss = loss + kl_coef * (torch.exp(delta) - delta - 1)
        return (loss * supervised).sum()

    return loss_fn
