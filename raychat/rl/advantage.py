"""From graded rollouts to what the learner trains on: advantages and micro-batches.

The objective is REINFORCE with a per-question baseline, as nanochat's RL: the replies to one question
form a group, and each reply's advantage is its reward minus the group's mean reward (`rl.advantage =
mean`), optionally divided by the group's standard deviation (`grpo`, as GRPO does). Every sampled token
of a reply carries its reply's advantage as its loss weight; the shared training step then minimises
sum(advantage x -log p(token)) / (sampled tokens of the step, all ranks): the token-level mean of the
policy gradient. `drgrpo` (Dr. GRPO, Liu et al. 2025) keeps the mean baseline without the std, and divides
by a constant instead, replies x rl.max_new_tokens (stage.py), so that neither a reply's length nor the
step's total length rescales a token's gradient. Prompt tokens and the calculator's forced output have no
target and weigh nothing.

A group whose replies all got the same reward (all right or all wrong) has advantage 0 everywhere: it
carries no signal. Such groups are counted (`zero_signal_groups`) so a run that learns nothing shows it.
"""
from __future__ import annotations

import torch

from raychat.train.step import Batch, pad_rows

ADVANTAGES = ("mean", "grpo", "drgrpo")
STD_EPS = 1e-4


def group_advantages(rewards: list[float], kind: str = "mean") -> list[float]:
    """Advantages of one group's replies (see the module docstring)."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {kind!r}")
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if kind == "grpo":
        std = (sum(c * c for c in centered) / len(centered)) ** 0.5
        centered = [c / (std + STD_EPS) for c in centered]
    return centered


def sample_rows(samples: list[dict], num_samples: int, kind: str) -> tuple[list[tuple], dict]:
    """(inputs, targets, weights, old log-probs, reference log-probs or None) per sample, and step
    statistics. `samples` come grouped by question, `num_samples` consecutive samples per group."""
    rows, zero_signal = [], 0
    for start in range(0, len(samples), num_samples):
        group = samples[start:start + num_samples]
        rewards = [s["reward"] for s in group]
        zero_signal += len(set(rewards)) == 1
        for sample, advantage in zip(group, group_advantages(rewards, kind)):
            ids, mask = sample["ids"], sample["mask"]
            targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            rows.append((ids[:-1], targets, [advantage if m else 0.0 for m in mask[1:]], sample.get("logprobs"),
                         sample.get("ref_logprobs")))
    n = max(1, len(samples))
    stats = {"reward": sum(s["reward"] for s in samples) / n, "zero_signal_groups": zero_signal,
             "groups": len(samples) // max(1, num_samples),
             "reply_tokens": sum(s["reply_tokens"] for s in samples) / n,
             "tool_calls": sum(s["tool_calls"] for s in samples) / n}
    return rows, stats


def micro_batches(rows: list[tuple], rows_per_batch: int) -> list[Batch]:
    """Rows padded to the longest of each micro-batch (padding: token 0, no target, weight 0)."""
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        inputs, targets, weights, old, ref = zip(*rows[start:start + rows_per_batch])
        batches.append(Batch(pad_rows(inputs, 0), pad_rows(targets, -1), pad_rows(weights, 0.0, torch.float32),
                             None if None in old else pad_rows(old, 0.0, torch.float32),
                             None if None in ref else pad_rows(ref, 0.0, torch.float32)))
    return batches
