"""Bits per byte: the validation loss made independent of the tokenizer.

Mean loss per token depends on how much text a token covers, so two tokenizers (or vocab sizes) cannot
be compared on it. Instead sum the loss (nats) of every predicted token and divide by the number of
UTF-8 bytes those tokens spell: bpb = total nats / (ln 2 * total bytes). Special tokens spell no bytes,
so they count 0 bytes and their loss is left out too (predicting <|bos|> is not compressing text).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch


def limit_tokens(batches: Iterable, max_tokens: int) -> Iterator:
    """Yield whole (inputs, targets) batches until at least `max_tokens` targets have been yielded."""
    seen = 0
    for inputs, targets in batches:
        if seen >= max_tokens:
            return
        yield inputs, targets
        seen += targets.numel()


@torch.no_grad()
def bpb_totals(model, batches: Iterable, token_bytes: torch.Tensor, distributed: bool = False) -> dict:
    """Sum nats and bytes over `batches`; returns {"nats", "bytes", "tokens"} (over all ranks when
    `distributed`: then every rank must call this, with its own share of the batches)."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            losses = model(inputs, targets=targets, loss_reduction="none").view(-1).double()
            flat = targets.reshape(-1)
            valid = flat >= 0  # -1 = ignored position (no target)
            num_bytes = torch.where(valid, token_bytes[flat.clamp(min=0)], torch.zeros_like(flat))
            total_nats += (losses * (num_bytes > 0)).sum()
            total_bytes += num_bytes.sum()
            total_tokens += valid.sum()
    finally:
        model.train(was_training)
    if distributed:
        import torch.distributed as dist
        for tensor in (total_nats, total_bytes, total_tokens):
            dist.all_reduce(tensor)
    return {"nats": total_nats.item(), "bytes": int(total_bytes.item()), "tokens": int(total_tokens.item())}


def evaluate_bpb(model, batches: Iterable, token_bytes: torch.Tensor, distributed: bool = False) -> float:
    """Bits per byte of `model` on `batches` of (inputs, targets); `token_bytes[id]` = UTF-8 bytes of a token
    (0 for special tokens). Call under the autocast context the model trains with."""
    totals = bpb_totals(model, batches, token_bytes, distributed=distributed)
    if totals["bytes"] == 0:
        raise ValueError("bits-per-byte needs at least one target token that spells bytes; got none")
    return totals["nats"] / (math.log(2) * totals["bytes"])
