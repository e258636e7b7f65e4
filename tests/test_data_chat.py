"""The conversation stream: packing never crops a conversation, SFT padding masks exactly the padding and
the non-assistant tokens, every rank gets its own share, and a rebuilt stream resumes exactly."""
import json
from collections import Counter

import pytest
import torch

from raychat.common import UserError
from raychat.data.chat import Batcher, ConversationStream, count_packed_rows, rank_share
from raychat.tasks.mixture import build_mixture

SPEC = "gsm8k:60,smoltalk:12,identity:40,spelling-bee:30,mmlu-aux:60"


@pytest.fixture(scope="module")
def mixture(data_dir):
    return build_mixture(SPEC, seed=3)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _rows_of(inputs, targets):
    """The real tokens of each packed row: the inputs up to the last target, plus that target."""
    rows = []
    for x, y in zip(inputs.tolist(), targets.tolist()):
        valid = sum(t != -1 for t in y)
        assert y[:valid] == x[1:valid] + [y[valid - 1]] and all(t == -1 for t in y[valid:])
        rows.append(x[:valid] + [y[valid - 1]])
    return rows


def test_packing_places_whole_conversations_and_drops_the_long_ones(mixture, tokenizer):
    seq_len = 128
    rendered = [tokenizer.render_conversation(mixture[i], max_tokens=2**62)[0] for i in range(len(mixture))]
    stream = ConversationStream(mixture, tokenizer, "pack", 4, seq_len, loop=False)
    bos = tokenizer.get_bos_token_id()
    pieces = []
    for inputs, targets in stream:
        assert inputs.shape[1] == seq_len
        for row in _rows_of(inputs, targets):
            assert row[0] == bos and len(row) <= seq_len + 1
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces += [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
    fits = [tuple(ids) for ids in rendered if len(ids) <= seq_len + 1]
    assert Counter(pieces) == Counter(fits)   # every conversation that fits, whole, exactly once
    long = sum(len(ids) > seq_len + 1 for ids in rendered)
    stats = stream.stats()
    assert long > 0 and stats["dropped"] == long and stats["cropped"] == 0
    assert stats["cropped_fraction"] == pytest.approx(sum(len(i) for i in rendered if len(i) > seq_len + 1)
                                                      / sum(map(len, rendered)))
    # the driver's row count (lengths only) is what the stream packs
    one_row_batches = ConversationStream(mixture, tokenizer, "pack", 1, seq_len, loop=False)
    rows = sum(len(_rows_of(*batch)) for batch in one_row_batches)
    assert count_packed_rows([len(ids) for ids in rendered], seq_len + 1) == (rows, long)


def test_sft_padding_masks_exactly_padding_and_non_assistant_tokens(mixture, tokenizer):
    """Hand computation per row: inputs = ids[:-1], targets = ids[1:] where the render mask is 1, -1 elsewhere
    and on padding; each micro-batch is as wide as its longest conversation."""
    seq_len, batch = 200, 3
    stream = ConversationStream(mixture, tokenizer, "pad", batch, seq_len, loop=False)
    pad = tokenizer.get_bos_token_id()
    position, cropped = 0, 0
    for inputs, targets in stream:
        renders = []
        for i in range(inputs.size(0)):
            ids, mask = tokenizer.render_conversation(mixture[position + i], max_tokens=2**62)
            cropped += len(ids) > seq_len + 1
            renders.append((ids[:seq_len + 1], mask[:seq_len + 1]))
        assert inputs.shape == targets.shape == (len(renders), max(len(ids) for ids, _ in renders) - 1)
        for row, (ids, mask) in enumerate(renders):
            n = len(ids) - 1
            expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (inputs.size(1) - n)
            assert targets[row].tolist() == expected
            assert inputs[row].tolist() == ids[:-1] + [pad] * (inputs.size(1) - n)
            assert int((targets[row] >= 0).sum()) == sum(mask[1:])
        position += len(renders)
    assert position == len(mixture) and stream.stats()["cropped"] == cropped > 0


def test_an_assistant_turn_is_exactly_what_sft_learns(tokenizer):
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    inputs, targets = next(ConversationStream([conversation], tokenizer, "pad", 1, 64, loop=False))
    learned = [t for t in targets[0].tolist() if t >= 0]
    assert tokenizer.decode(learned) == "Hello!<|assistant_end|>4<|assistant_end|>"


def test_the_epoch_changes_when_the_next_pass_is_used(tokenizer):
    conversations = [{"messages": [{"role": "user", "content": f"{i}"}, {"role": "assistant", "content": "ok"}]}
                     for i in range(8)]
    stream = ConversationStream(conversations, tokenizer, "pad", 4, 32)
    epochs = []
    for _ in range(3):
        next(stream)
        epochs.append(stream.stats()["epoch"])
    stream.close()
    assert epochs == [0, 0, 1]   # the 8th conversation ends pass 1; the 9th starts pass 2


def test_ranks_read_disjoint_shares_of_equal_size(mixture):
    shares = [rank_share(len(mixture), r, 3) for r in range(3)]
    assert all(len(s) == len(mixture) // 3 for s in shares)
    assert sorted(sum(shares, [])) == list(range(len(mixture) // 3 * 3))


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_resume_is_exact_mid_epoch_and_across_epochs(mixture, tokenizer, mode):
    """Rank 1 of 2: the stream rebuilt from the cursor after k batches yields exactly the batches the
    uninterrupted one yields after k, through the end of an epoch into the next."""
    seq_len, batch = 96, 3
    per_epoch = {"pack": len(list(ConversationStream(mixture, tokenizer, mode, batch, seq_len, 1, 2, loop=False))),
                 "pad": -(-(len(mixture) // 2) // batch)}[mode]
    total = per_epoch + 4
    clean = ConversationStream(mixture, tokenizer, mode, batch, seq_len, 1, 2)
    reference = _take(clean, total)
    assert clean.state_dict()["next_seq"] > len(mixture) // 2   # it has read into the second epoch
    for k in (1, per_epoch // 2, per_epoch - 1):
        first = ConversationStream(mixture, tokenizer, mode, batch, seq_len, 1, 2)
        _take(first, k)
        cursor = json.loads(json.dumps(first.state_dict()))   # it is saved as JSON-able data
        first.close()
        resumed = ConversationStream(mixture, tokenizer, mode, batch, seq_len, 1, 2, cursor=cursor)
        for (a, b), (c, d) in zip(_take(resumed, total - k), reference[k:]):
            assert torch.equal(a, c) and torch.equal(b, d)
        assert resumed.state_dict() == clean.state_dict()   # counters included
        resumed.close()
    clean.close()


def test_a_cursor_resumes_only_its_own_stream(mixture, tokenizer):
    stream = ConversationStream(mixture, tokenizer, "pack", 2, 64, 0, 2)
    next(stream)
    cursor = stream.state_dict()
    stream.close()
    with pytest.raises(UserError, match="the number of workers changed"):
        Batcher(mixture, tokenizer, "pack", 2, 64, 0, 4).check(cursor)
    with pytest.raises(UserError, match="the packing mode changed"):
        Batcher(mixture, tokenizer, "pad", 2, 64, 0, 2).check(cursor)
    with pytest.raises(UserError, match=r"the row length \(sequence_len \+ 1\) changed"):
        Batcher(mixture, tokenizer, "pack", 2, 128, 0, 2).check(cursor)
    with pytest.raises(UserError, match="not a version-1 conversation cursor"):
        Batcher(mixture, tokenizer, "pack", 2, 64, 0, 2).check({"next_seq": 3})
    with pytest.raises(UserError, match="fewer than the 4 workers"):
        Batcher(mixture[:3] if isinstance(mixture, list) else [mixture[i] for i in range(3)], tokenizer, "pad", 1, 64,
                0, 4)


def test_a_failure_in_the_producer_reaches_the_consumer(tokenizer):
    broken = [{"messages": [{"role": "assistant", "content": "I speak first"}]}]
    stream = ConversationStream(broken, tokenizer, "pad", 1, 32)
    with pytest.raises(ValueError, match="expected 'user'"):
        next(stream)
    with pytest.raises(ValueError):   # and stays failed
        next(stream)
