"""The conversation stream of mid-training and SFT: a mixture -> rendered conversations -> micro-batches,
per rank, with an exact resume cursor.

Rank r of W takes the mixture positions r, r+W, r+2W, ... (`len(mixture) // W` of them per epoch, so every
rank gets as many) and numbers them 0, 1, 2, ... across epochs: item `seq` is mixture position
`(seq % per_rank) * W + r`. Each is rendered by the tokenizer into ids and a loss mask. Rows are made in
one of two ways:

- `pack` (mid-training): rows of T+1 tokens that start at a conversation's <|bos|>. Conversations are
  placed whole, best fit from a buffer of PACK_BUFFER: the longest buffered conversation that still fits
  (ties: the oldest); when none fits, the rest of the row is padding. A conversation longer than a row is
  dropped and counted, never cropped. Every token of a conversation is a target, as in nanochat's
  mid-training (the model learns the whole format); padding is not (target -1).
- `pad` (SFT): one conversation per row, padded to the longest row of the micro-batch; a conversation
  longer than T+1 tokens is cropped (counted). The target is -1 wherever the render mask is 0 (user
  turns, tool output) and on padding, so only what the assistant writes is learned.

The cursor (`state_dict()`) is the next unread `seq`, the `seq`s still in the packing buffer, and the
counters. A stream rebuilt from it re-renders those buffered conversations and yields exactly the
batches the uninterrupted stream would have: nothing replayed, nothing skipped.

Batches are made one ahead in a background thread (rendering is Python work the step need not wait for);
each carries the cursor after it, so `state_dict()` always describes what the consumer has taken.
"""
from __future__ import annotations

import atexit
import bisect
import queue
import threading
import time
from typing import Iterator, Sequence

import torch

from raychat.common import UserError

PACK_BUFFER = 64          # conversations held for best-fit packing
CURSOR_VERSION = 1
MODES = ("pack", "pad")
_END = object()
_PRODUCERS: list[tuple[threading.Thread, threading.Event]] = []   # live producer threads


@atexit.register
def _stop_producers() -> None:
    """Stop producer threads before the interpreter exits: a daemon thread frozen inside the tokenizer's
    native code at shutdown aborts the process."""
    for thread, stop in _PRODUCERS:
        stop.set()
    for thread, _ in _PRODUCERS:
        thread.join(timeout=10)


class Packer:
    """Best-fit packing of whole conversations (seq, ids) into rows of `row_len` tokens; owns the buffer
    and the drop counters. Works on anything with a length as ids, so the driver can count rows from
    lengths alone (`count_packed_rows`)."""

    def __init__(self, row_len: int, items: Iterator, buffered=(), capacity: int = PACK_BUFFER):
        self.row_len, self.items, self.capacity = row_len, items, capacity
        self.keys, self.buffer = [], []    # sorted by (length, -seq): the longest fitting one is found by bisect
        self.exhausted = False
        self.dropped = self.dropped_tokens = self.read_tokens = 0
        for seq, ids in buffered:
            self._insert(seq, ids)

    def _insert(self, seq: int, ids) -> None:
        key = (len(ids), -seq)
        i = bisect.bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.buffer.insert(i, ids)

    def _fill(self) -> None:
        while len(self.keys) < self.capacity and not self.exhausted:
            try:
                seq, ids = next(self.items)
            except StopIteration:
                self.exhausted = True
                return
            self.read_tokens += len(ids)
            if len(ids) > self.row_len:
                self.dropped += 1
                self.dropped_tokens += len(ids)
            else:
                self._insert(seq, ids)

    def next_row(self) -> list | None:
        """The conversations (ids) of the next row, in placement order; None when nothing is left."""
        chosen, space = [], self.row_len
        while space > 0:
            self._fill()
            i = bisect.bisect_right(self.keys, (space, 0)) - 1   # longest with length <= space; ties: oldest
            if i < 0:
                break
            self.keys.pop(i)
            ids = self.buffer.pop(i)
            chosen.append(ids)
            space -= len(ids)
        return chosen or None

    def buffered_seqs(self) -> list[int]:
        return sorted(-seq for _, seq in self.keys)


def count_packed_rows(lengths: Sequence[int], row_len: int) -> tuple[int, int]:
    """(rows, dropped conversations) of one pass of `pack` over conversations of these token lengths."""
    packer = Packer(row_len, ((seq, range(n)) for seq, n in enumerate(lengths)))
    rows = 0
    while packer.next_row() is not None:
        rows += 1
    return rows, packer.dropped


def rank_share(num_conversations: int, rank: int, world: int) -> list[int]:
    """The mixture positions rank `rank` of `world` reads each epoch, in order."""
    return list(range(rank, num_conversations // world * world, world))


class Batcher:
    """Makes one rank's micro-batches from a cursor: the whole of the stream's logic except the thread
    that `ConversationStream` runs it in."""

    def __init__(self, conversations: Sequence[dict], tokenizer, mode: str, batch_size: int, seq_len: int,
                 rank: int = 0, world: int = 1, loop: bool = True):
        if mode not in MODES:
            raise UserError(f"unknown conversation packing '{mode}': expected one of {', '.join(MODES)}")
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world:
            raise UserError(f"bad stream shape: batch_size {batch_size}, seq_len {seq_len}, rank {rank} of {world}")
        self.conversations, self.tokenizer = conversations, tokenizer
        self.mode, self.batch_size, self.row_len = mode, batch_size, seq_len + 1
        self.rank, self.world, self.loop = rank, world, loop
        self.per_rank = len(conversations) // world
        if self.per_rank == 0:
            raise UserError(f"the mixture has {len(conversations)} conversation(s), fewer than the {world} workers "
                            f"that share it")
        self.pad_id = tokenizer.get_bos_token_id()   # any id: padded positions have no target

    def new_cursor(self) -> dict:
        return {"version": CURSOR_VERSION, "mode": self.mode, "row_len": self.row_len, "rank": self.rank,
                "world": self.world, "conversations": len(self.conversations), "next_seq": 0, "buffer": [],
                "dropped": 0, "dropped_tokens": 0, "read_tokens": 0, "cropped": 0, "cropped_tokens": 0}

    def check(self, cursor: dict) -> dict:
        """Refuse a cursor this stream cannot continue exactly, naming what differs."""
        if not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION:
            raise UserError(f"data cursor is not a version-{CURSOR_VERSION} conversation cursor: {str(cursor)[:80]}")
        mine = self.new_cursor()
        for key, what in (("rank", "rank"), ("world", "number of workers"), ("mode", "packing mode"),
                          ("row_len", "row length (sequence_len + 1)"), ("conversations", "mixture size")):
            if cursor.get(key) != mine[key]:
                raise UserError(f"data cursor cannot be resumed: the {what} changed ({cursor.get(key)!r} -> "
                                f"{mine[key]!r}); restore the old setting or start a new run.name")
        return {**mine, **cursor, "buffer": list(cursor["buffer"])}

    def render(self, seq: int) -> tuple[list[int], list[int]]:
        index = (seq % self.per_rank) * self.world + self.rank
        return self.tokenizer.render_conversation(self.conversations[index], max_tokens=2**62)

    def _items(self, start: int) -> Iterator[tuple[int, list[int], list[int]]]:
        seq = start
        while self.loop or seq < self.per_rank:
            yield (seq, *self.render(seq))
            seq += 1

    def batches(self, cursor: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(inputs, targets, cursor after this batch), from `cursor` on."""
        return self._packed(cursor) if self.mode == "pack" else self._padded(cursor)

    def _packed(self, c: dict):
        state = {"next_seq": c["next_seq"]}

        def pulled():
            for seq, ids, _ in self._items(c["next_seq"]):
                state["next_seq"] = seq + 1
                yield seq, ids

        packer = Packer(self.row_len, pulled(), [(seq, self.render(seq)[0]) for seq in c["buffer"]])
        packer.dropped, packer.dropped_tokens, packer.read_tokens = c["dropped"], c["dropped_tokens"], c["read_tokens"]
        while True:
            rows = []
            while len(rows) < self.batch_size and (row := packer.next_row()) is not None:
                rows.append([token for ids in row for token in ids])
            if not rows:
                return
            inputs = torch.full((len(rows), self.row_len - 1), self.pad_id, dtype=torch.long)
            targets = torch.full((len(rows), self.row_len - 1), -1, dtype=torch.long)
            for i, row in enumerate(rows):
                row = torch.tensor(row, dtype=torch.long)
                inputs[i, :len(row) - 1] = row[:-1]
                targets[i, :len(row) - 1] = row[1:]
            yield inputs, targets, {**c, "next_seq": state["next_seq"], "buffer": packer.buffered_seqs(),
                                    "dropped": packer.dropped, "dropped_tokens": packer.dropped_tokens,
                                    "read_tokens": packer.read_tokens}
            if len(rows) < self.batch_size:
                return

    def _padded(self, c: dict):
        items = self._items(c["next_seq"])
        c = dict(c)
        while True:
            rows = []
            for seq, ids, mask in items:
                c["next_seq"] = seq + 1
                c["read_tokens"] += len(ids)
                if len(ids) > self.row_len:
                    c["cropped"] += 1
                    c["cropped_tokens"] += len(ids) - self.row_len
                    ids, mask = ids[:self.row_len], mask[:self.row_len]
                rows.append((ids, mask))
                if len(rows) == self.batch_size:
                    break
            if not rows:
                return
            width = max(len(ids) for ids, _ in rows) - 1
            inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            targets = torch.full((len(rows), width), -1, dtype=torch.long)
            for i, (ids, mask) in enumerate(rows):
                ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
                n = len(ids) - 1
                inputs[i, :n] = ids[:-1]
                targets[i, :n] = torch.where(mask[1:], ids[1:], -1)
            yield inputs, targets, dict(c)
            if len(rows) < self.batch_size:
                return


def _produce(batches: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """The stream's background thread; it holds no reference to the stream, so a stream that is dropped
    unfinished is garbage-collected, which stops this thread."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in batches:
            if not put(batch):
                return
        put(_END)
    except BaseException as error:   # handed to the consumer, raised there
        put(error)


class ConversationStream:
    """Per-rank iterator of micro-batches `(inputs, targets)` (LongTensors (B, L), targets -1 = no loss).

    `loop=True` cycles through epochs forever (training); `loop=False` makes one pass and then stops, the
    last batch possibly smaller (validation). `state_dict()` / `cursor=` resume exactly (same rank, world
    size, mixture, mode and row length)."""

    def __init__(self, conversations: Sequence[dict], tokenizer, mode: str, batch_size: int, seq_len: int,
                 rank: int = 0, world: int = 1, cursor: dict | None = None, loop: bool = True):
        self.batcher = Batcher(conversations, tokenizer, mode, batch_size, seq_len, rank, world, loop)
        self._cursor = self.batcher.check(cursor) if cursor is not None else self.batcher.new_cursor()
        self._wait_s, self._queue, self._stop = 0.0, queue.Queue(maxsize=2), threading.Event()
        self._thread = threading.Thread(target=_produce, args=(self.batcher.batches(dict(self._cursor)),
                                                               self._queue, self._stop),
                                        daemon=True, name=f"raychat-chat-{mode}-rank{rank}")
        _PRODUCERS[:] = [(t, e) for t, e in _PRODUCERS if t.is_alive()] + [(self._thread, self._stop)]
        self._thread.start()

    def state_dict(self) -> dict:
        """The cursor after the last batch taken (JSON-serialisable; pass it back as `cursor=`)."""
        return {**self._cursor, "buffer": list(self._cursor["buffer"])}

    def stats(self) -> dict:
        """epoch, wait_s (time the consumer waited), cropped_fraction (tokens of dropped or cropped
        conversations / tokens rendered), dropped and cropped conversations.

        The epoch is that of the oldest conversation read but not used yet (packing reads ahead into its
        buffer), or when none waits, of the last one used: a pass that has just been used up entirely is
        not yet the next one."""
        c = self._cursor
        lost = c["dropped_tokens"] + c["cropped_tokens"]
        current = min(c["buffer"], default=max(c["next_seq"] - 1, 0))
        return {"epoch": current // self.batcher.per_rank, "wait_s": self._wait_s,
                "cropped_fraction": lost / c["read_tokens"] if c["read_tokens"] else 0.0,
                "dropped": c["dropped"], "cropped": c["cropped"]}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        waited = time.perf_counter()
        item = self._queue.get()
        self._wait_s += time.perf_counter() - waited
        if item is _END or isinstance(item, BaseException):
            self._queue.put(item)   # stay exhausted / failed
            if item is _END:
                raise StopIteration
            raise item
        inputs, targets, self._cursor = item
        return inputs, targets

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
