"""Bits per byte equals a hand computation: nats of every target that spells bytes, over ln 2 x bytes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evalkit import tiny_gpt
from raychat.eval.bpb import bpb_totals, evaluate_bpb, limit_tokens

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Bits per byte: café, naïve, 数字 and emoji 🙂 too.",
         "Water boils at 100 degrees Celsius at sea level.", "A second document after a BOS token."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt(tokenizer.get_vocab_size(), seed=3, sequence_len=64)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two rows of 24 targets: documents joined by BOS (a special target: 0 bytes), one position ignored."""
    stream = [t for text in TEXTS for t in tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())]
    assert len(stream) >= 50
    rows = torch.tensor([stream[:25], stream[25:50]])
    inputs, targets = rows[:, :-1].clone(), rows[:, 1:].clone()
    targets[1, 3] = -1
    assert (targets == tokenizer.get_bos_token_id()).any()
    return inputs, targets


def hand_bpb(model, tokenizer, batches, count_specials=False) -> float:
    nats, num_bytes = 0.0, 0
    for inputs, targets in batches:
        with torch.no_grad():
            logp = F.log_softmax(model(inputs).double(), dim=-1)
        for b in range(targets.size(0)):
            for t in range(targets.size(1)):
                target = int(targets[b, t])
                if target < 0:
                    continue
                n = int(tokenizer.token_bytes[target])
                if n > 0 or count_specials:
                    nats -= logp[b, t, target].item()
                num_bytes += n
    return nats / (math.log(2) * num_bytes)


def test_token_bytes_count_the_utf8_bytes_of_the_text(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
        assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_bpb_equals_the_hand_computation(model, tokenizer, batch):
    got = evaluate_bpb(model, [batch], tokenizer.token_bytes)
    assert got == pytest.approx(hand_bpb(model, tokenizer, [batch]), rel=1e-6)
    # leaving out the special targets' loss is what makes it differ from the naive sum
    assert got != pytest.approx(hand_bpb(model, tokenizer, [batch], count_specials=True), rel=1e-4)


def test_bpb_pools_nats_and_bytes_over_batches(model, tokenizer, batch):
    inputs, targets = batch
    halves = [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])]
    pooled = evaluate_bpb(model, halves, tokenizer.token_bytes)
    assert pooled == pytest.approx(hand_bpb(model, tokenizer, [batch]), rel=1e-6)
    per_batch = [evaluate_bpb(model, [h], tokenizer.token_bytes) for h in halves]
    assert pooled != pytest.approx(sum(per_batch) / 2, rel=1e-6)   # not a mean of per-batch ratios
    totals = bpb_totals(model, halves, tokenizer.token_bytes)
    assert totals["tokens"] == 47 and totals["bytes"] == int(tokenizer.token_bytes[targets[targets >= 0]].sum())


def test_bpb_restores_training_mode_and_rejects_no_bytes(model, tokenizer, batch):
    model.train()
    evaluate_bpb(model, [batch], tokenizer.token_bytes)
    assert model.training
    model.eval()
    inputs, _ = batch
    with pytest.raises(ValueError, match="at least one target"):
        evaluate_bpb(model, [(inputs, torch.full_like(inputs, -1))], tokenizer.token_bytes)


def test_limit_tokens_yields_whole_batches_up_to_the_budget():
    batches = [(torch.zeros(2, 16), torch.full((2, 16), i)) for i in range(10)]
    taken = list(limit_tokens(iter(batches), 70))   # 32 tokens per batch: 3 batches reach 70
    assert [int(t[0, 0]) for _, t in taken] == [0, 1, 2]
    assert len(list(limit_tokens(iter(batches), 64))) == 2
    assert len(list(limit_tokens(iter(batches[:1]), 10_000))) == 1   # a short stream just ends
