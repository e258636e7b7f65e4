"""The pretraining token stream: shards -> tokenized documents -> packed (B, T) batches, per rank, resumable.

Ray Data cannot resume a stream mid-epoch, and its `streaming_split` does not give a rank the same data
twice, so raychat owns the data position. Every rank reads a fixed share of the corpus: its contiguous
slice (1/world_size) of every parquet row group, in file and row-group order. The share numbers its
documents 0, 1, 2, ... and keeps counting across epochs (document `seq` of epoch e is
`e * docs_per_epoch + k`), so a position is one integer.

Per rank, Ray Data (or the same functions in a plain loop with `use_ray=False`) reads the share's
row-group slices and tokenizes them in `map_batches` with BOS prepended to every document, in order.
A share whose text fits `data.cache_mb` (the demo, the tests) is tokenized once, in one pipeline, and
every epoch is served from those tokens. A larger share is tokenized in chunks of work items, one
chunk ahead of the packer: each chunk is its own short Ray Data pipeline, drained as fast as it
produces. A Ray Data executor whose output waits on a slow consumer polls in a tight loop (measured on
2 cores: 1.4 s of CPU per 1.1 s training step, the stream's 2.19x), so no pipeline is ever left
waiting on the training step. Packing happens on the consuming side, in a background thread, into rows
of T+1 tokens (inputs = row[:-1], targets = row[1:]):

- `concat`: documents are concatenated and cut into rows; no token is dropped (nanochat v0).
- `bos_bestfit`: every row starts at a document's BOS; from a buffer of documents, the longest one that
  still fits is placed, and when none fits the shortest is cropped to fill the row (the rest is dropped).

The cursor (`state_dict()`) is the packer's state after the last yielded batch: the next unread `seq`,
plus, for `concat`, the token offset into the document the next row starts in, or, for `bos_bestfit`,
the `seq`s still in the buffer. Rebuilding from it re-reads exactly those documents, so the rebuilt
stream yields the rows the uninterrupted one would have: nothing replayed, nothing skipped.
"""
from __future__ import annotations

import atexit
import bisect
import hashlib
import itertools
import pickle
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

from raychat.common import UserError
from raychat.data.fineweb import open_shard, shard_paths

CURSOR_VERSION = 1
ITEMS_PER_TASK = 8   # work items per task slot in a chunk: a pipeline's start-up (~0.5 s) is paid once per chunk


# ------------------------------------------------------------------------------- which documents

class DocumentPlan:
    """The documents one rank reads each epoch: its slice of every row group, in a fixed order."""

    def __init__(self, paths: list[Path], rank: int, world_size: int):
        self.paths = [str(p) for p in paths]
        self.units = []   # (path index, row group, first row, end row) in reading order
        self.text_bytes = 0   # uncompressed size of the share's text (from the parquet metadata)
        for index, path in enumerate(paths):
            parquet = open_shard(path)
            metadata, text_column = parquet.metadata, parquet.schema_arrow.get_field_index("text")
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                start, stop = rows * rank // world_size, rows * (rank + 1) // world_size
                if stop > start:
                    self.units.append((index, group, start, stop))
                    group_bytes = metadata.row_group(group).column(text_column).total_uncompressed_size
                    self.text_bytes += group_bytes * (stop - start) // rows
        self.unit_starts = np.cumsum([0] + [stop - start for _, _, start, stop in self.units]).tolist()
        self.docs_per_epoch = self.unit_starts[-1]

    def work_items(self, seq: int, max_docs: int) -> list[dict]:
        """Read+tokenize tasks from document `seq` to the end of its epoch: row-group slices cut into
        pieces of at most `max_docs` documents (small tasks: the first batch comes early, work spreads)."""
        epoch, k = divmod(seq, self.docs_per_epoch)
        first = bisect.bisect_right(self.unit_starts, k) - 1
        items = []
        for u in range(first, len(self.units)):
            index, group, start, stop = self.units[u]
            skip = k - self.unit_starts[u] if u == first else 0
            for piece in range(start + skip, stop, max_docs):
                items.append({"path": self.paths[index], "row_group": group, "start": piece,
                              "stop": min(piece + max_docs, stop),
                              "first_seq": epoch * self.docs_per_epoch + self.unit_starts[u] + piece - start})
        return items

    def items_for(self, seqs) -> list[dict]:
        """Read tasks covering an arbitrary set of documents (a cursor's best-fit buffer): one per row-group
        slice they fall in, spanning the first to the last of them, so each row group is read once."""
        spans: dict[tuple[int, int], list[int]] = {}   # (epoch, unit) -> [first k, last k]
        for seq in sorted(seqs):
            epoch, k = divmod(seq, self.docs_per_epoch)
            u = bisect.bisect_right(self.unit_starts, k) - 1
            spans.setdefault((epoch, u), [k, k])[1] = k
        items = []
        for (epoch, u), (first, last) in spans.items():
            index, group, start, _ = self.units[u]
            row = start + first - self.unit_starts[u]
            items.append({"path": self.paths[index], "row_group": group, "start": row,
                          "stop": row + last - first + 1, "first_seq": epoch * self.docs_per_epoch + first})
        return items


# ------------------------------------------------------------ read + tokenize (runs in Ray Data tasks)

def read_documents(batch):
    """map_batches: read tasks (pyarrow table of path/row_group/start/stop/first_seq) -> (seq, text) rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    seqs, texts = [], []
    for item in batch.to_pylist():
        column = pq.ParquetFile(item["path"]).read_row_group(item["row_group"], columns=["text"]).column("text")
        texts.extend(column.slice(item["start"], item["stop"] - item["start"]).to_pylist())
        seqs.extend(range(item["first_seq"], item["first_seq"] + item["stop"] - item["start"]))
    return pa.table({"seq": pa.array(seqs, pa.int64()), "text": pa.array(texts, pa.large_string())})


_TOKENIZERS: dict[str, object] = {}   # per worker process: unpickled once, reused by every task


def _tokenizer_from(blob: bytes):
    key = hashlib.sha1(blob).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = pickle.loads(blob)
    return _TOKENIZERS[key]


def tokenize_documents(batch, tokenizer_blob: bytes, bos: int):
    """map_batches: (seq, text) rows -> (seq, tokens) rows, BOS prepended, tiktoken batch encoding."""
    import pyarrow as pa
    tokenizer = _tokenizer_from(tokenizer_blob)
    ids = tokenizer.encode(batch.column("text").to_pylist(), prepend=bos)
    return pa.table({"seq": batch.column("seq"), "tokens": pa.array(ids, pa.list_(pa.int32()))})


def _table_documents(table) -> Iterator[tuple[int, np.ndarray]]:
    seqs = table.column("seq").to_numpy()
    tokens = table.column("tokens").combine_chunks()
    offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
    for i, seq in enumerate(seqs):
        yield int(seq), values[offsets[i]:offsets[i + 1]]


def _local_documents(items, tokenizer_blob, bos) -> Iterator[tuple[int, np.ndarray]]:
    """The same read -> tokenize steps in this process, in order (use_ray=False)."""
    for item in items:
        yield from _table_documents(_local_tokenize([item], tokenizer_blob, bos)[0])


def _local_tokenize(items, tokenizer_blob, bos) -> list:
    """The read -> tokenize steps for `items`, in this process: one (seq, tokens) table per item."""
    import pyarrow as pa
    return [tokenize_documents(read_documents(pa.Table.from_pylist([item])), tokenizer_blob, bos) for item in items]


def _ray_tokenize(items, tokenizer_blob, bos, tasks, buffer_mb) -> list:
    """Read and tokenize `items` in Ray Data tasks, to completion: (seq, tokens) tables in item order.

    Both steps take whole blocks (one work item each): a row batch size on the tokenize step would make
    Ray Data bundle that many work items into one task. At most `tasks` run at once, and at most
    `buffer_mb` of blocks wait in the object store. The pipeline is drained at once, never paced by
    training: paced, its executor would poll in a tight loop while its output waits."""
    import ray.data
    pool = ray.data.TaskPoolStrategy(size=tasks)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_documents, batch_size=None, batch_format="pyarrow", compute=pool)
    ds = ds.map_batches(tokenize_documents, batch_size=None, batch_format="pyarrow", compute=pool,
                        fn_kwargs={"tokenizer_blob": tokenizer_blob, "bos": bos})
    ds.context.execution_options.preserve_order = True   # the packer needs documents in seq order
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=buffer_mb * 2**20)
    return list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def _chunked(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ray_documents(items: Iterator[dict], chunk_items: int, tokenizer_blob, bos, tasks,
                   buffer_mb) -> Iterator[tuple[int, np.ndarray]]:
    """Documents of `items`, tokenized by Ray Data in chunks of `chunk_items` work items, one chunk ahead:
    while the packer reads chunk n, chunk n + 1 is tokenized in a helper thread (bounded read-ahead)."""
    from concurrent.futures import ThreadPoolExecutor
    chunks = _chunked(items, chunk_items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raychat-tokenize") as pool:
        submit = (lambda chunk: None if chunk is None else
                  pool.submit(_ray_tokenize, chunk, tokenizer_blob, bos, tasks, buffer_mb))
        pending = submit(next(chunks, None))
        while pending is not None:
            tables = pending.result()
            pending = submit(next(chunks, None))
            for table in tables:
                yield from _table_documents(table)


class _TokenizedEpoch:
    """Every document of one epoch of a rank's share, tokenized once: document k is tokens[k]."""

    def __init__(self, tables: list):
        import pyarrow as pa
        tokens = pa.chunked_array([t.column("tokens") for t in tables]).combine_chunks()
        self.offsets, self.values = tokens.offsets.to_numpy(), tokens.values.to_numpy()

    def __getitem__(self, k: int) -> np.ndarray:
        return self.values[self.offsets[k]:self.offsets[k + 1]]


# ------------------------------------------------------------------------------------------ packing

class _Packer:
    """Turns the ordered document stream into rows of `row_len` tokens; owns the cursor state."""

    def __init__(self, mode: str, row_len: int, buffer_docs: int, documents: Iterator, next_seq: int,
                 head=None, buffered=()):
        self.mode, self.row_len, self.buffer_docs = mode, row_len, buffer_docs
        self.documents = documents          # yields (seq, tokens) starting at next_seq
        self.next_seq = next_seq
        self.head = head                    # concat: [seq, tokens, offset] of the document being cut
        self.keys, self.docs = [], []       # bos_bestfit: buffer sorted by (length, -seq)
        for seq, tokens in buffered:
            self._insert(seq, tokens)
        self.exhausted = False
        self.cropped_tokens = 0
        self.packed_tokens = 0

    def _pull(self):
        if self.exhausted:
            return None
        try:
            seq, tokens = next(self.documents)
        except StopIteration:
            self.exhausted = True
            return None
        assert seq == self.next_seq, f"document stream out of order: got {seq}, expected {self.next_seq}"
        self.next_seq += 1
        return seq, tokens

    def _insert(self, seq, tokens):
        key = (len(tokens), -seq)
        i = bisect.bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.docs.insert(i, tokens)

    def row(self) -> np.ndarray | None:
        return self._concat_row() if self.mode == "concat" else self._bestfit_row()

    def _concat_row(self):
        row, filled = np.empty(self.row_len, dtype=np.int64), 0
        while filled < self.row_len:
            if self.head is None:
                document = self._pull()
                if document is None:
                    return None
                self.head = [document[0], document[1], 0]
            seq, tokens, offset = self.head
            take = min(self.row_len - filled, len(tokens) - offset)
            row[filled:filled + take] = tokens[offset:offset + take]
            filled += take
            self.head[2] += take
            if self.head[2] == len(tokens):
                self.head = None
        self.packed_tokens += self.row_len
        return row

    def _bestfit_row(self):
        row, filled = np.empty(self.row_len, dtype=np.int64), 0
        while filled < self.row_len:
            while len(self.keys) < self.buffer_docs:
                document = self._pull()
                if document is None:
                    break
                self._insert(*document)
            if not self.keys:
                return None
            remaining = self.row_len - filled
            # the longest document that fits whole (ties: the oldest); none fits -> crop the shortest
            i = bisect.bisect_right(self.keys, (remaining, 0)) - 1
            if i < 0:
                i = 0
            self.keys.pop(i)
            tokens = self.docs.pop(i)
            take = min(remaining, len(tokens))
            row[filled:filled + take] = tokens[:take]
            filled += take
            self.cropped_tokens += len(tokens) - take
        self.packed_tokens += self.row_len
        return row

    def cursor(self) -> dict:
        if self.mode == "concat":
            if self.head is not None:
                return {"next_seq": self.head[0], "offset": self.head[2], "buffer": []}
            return {"next_seq": self.next_seq, "offset": 0, "buffer": []}
        return {"next_seq": self.next_seq, "offset": 0, "buffer": sorted(-seq for _, seq in self.keys)}


def measure_packing(tokenizer, paths: list[Path], mode: str, seq_len: int, buffer_docs: int,
                    max_docs: int = 4000) -> dict:
    """Pack the first `max_docs` documents of `paths` as the stream would (rows of seq_len + 1 tokens) and
    measure {"cropped_fraction": tokens dropped by best-fit cropping / tokens read, "chars_per_token",
    "documents"}: what the shard budget needs, measured on the actual tokenizer and corpus."""
    from itertools import islice

    from raychat.data.fineweb import iter_documents
    texts = list(islice(iter_documents(paths), max_docs))
    if not texts:
        raise UserError(f"no documents in {', '.join(str(p) for p in paths[:2])}: cannot plan the data budget")
    ids = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
    documents = ((seq, np.asarray(tokens, dtype=np.int64)) for seq, tokens in enumerate(ids))
    packer = _Packer(mode, seq_len + 1, buffer_docs, documents, 0)
    while packer.row() is not None:
        pass
    read = packer.packed_tokens + packer.cropped_tokens
    return {"cropped_fraction": packer.cropped_tokens / read if read else 0.0,
            "chars_per_token": sum(map(len, texts)) / sum(map(len, ids)), "documents": len(texts)}


# ------------------------------------------------------------------------------------------ stream

_END = object()
_PRODUCERS: "weakref.WeakSet[_Producer]" = weakref.WeakSet()   # alive while their thread runs


@atexit.register
def _stop_producers() -> None:
    """Stop producer threads before the interpreter exits: a daemon thread frozen inside the tokenizer's
    native code at shutdown aborts the process ("terminate called without an active exception")."""
    producers = list(_PRODUCERS)
    for producer in producers:
        producer.stop.set()
    for producer in producers:
        if producer.thread is not None:
            producer.thread.join(timeout=10)


class _Producer:
    """Runs in the stream's background thread: documents -> packer -> batches, into a bounded queue.

    It holds no reference to the PretrainStream, so a stream that is dropped unfinished (an abandoned
    validation pass) is garbage-collected, which stops this thread and its Ray Data pipeline.
    """

    def __init__(self, plan: DocumentPlan, split: str, mode: str, batch_size: int, seq_len: int, buffer_docs: int,
                 tokenizer_blob: bytes, bos: int, tokenizer_batch_size: int, prefetch: int, use_ray: bool,
                 tasks: int, buffer_mb: int, cache_mb: int):
        self.plan, self.split, self.mode = plan, split, mode
        self.batch_size, self.seq_len, self.buffer_docs = batch_size, seq_len, buffer_docs
        self.tokenizer_blob, self.bos, self.tokenizer_batch_size = tokenizer_blob, bos, tokenizer_batch_size
        self.prefetch, self.use_ray, self.tasks, self.buffer_mb = prefetch, use_ray, tasks, buffer_mb
        self.cache_mb, self.epoch = cache_mb, None   # epoch: the share's tokens, when it fits cache_mb
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def documents(self, start_seq: int) -> Iterator[tuple[int, np.ndarray]]:
        """Documents from `start_seq` on; train wraps forever, val stops after one pass."""
        # a small train share is tokenized once, for every epoch (val is read once anyway)
        if self.split == "train" and self.plan.text_bytes <= self.cache_mb * 2**20:
            if self.epoch is None:
                items = self.plan.work_items(0, self.tokenizer_batch_size)
                self.epoch = _TokenizedEpoch(
                    _ray_tokenize(items, self.tokenizer_blob, self.bos, self.tasks, self.buffer_mb) if self.use_ray
                    else _local_tokenize(items, self.tokenizer_blob, self.bos))
            for seq in itertools.count(start_seq):
                yield seq, self.epoch[seq % self.plan.docs_per_epoch]
        elif self.use_ray:
            yield from _ray_documents(self.work_items(start_seq), ITEMS_PER_TASK * self.tasks, self.tokenizer_blob,
                                      self.bos, self.tasks, self.buffer_mb)
        else:
            yield from _local_documents(self.work_items(start_seq), self.tokenizer_blob, self.bos)

    def work_items(self, start_seq: int) -> Iterator[dict]:
        """Read+tokenize work items from `start_seq` on, epoch after epoch (val: to the end of its pass)."""
        seq, per_epoch = start_seq, self.plan.docs_per_epoch
        while not (self.split == "val" and seq >= per_epoch):
            yield from self.plan.work_items(seq, self.tokenizer_batch_size)
            seq = (seq // per_epoch + 1) * per_epoch

    def restore(self, position: dict) -> _Packer:
        """A packer in the state the cursor describes: its buffered documents re-read and re-tokenized."""
        next_seq, offset, buffer = position["next_seq"], position["offset"], position["buffer"]
        restored = []
        if buffer:   # read the row groups they sit in, tokenize only the buffered documents
            import pyarrow as pa
            import pyarrow.compute as pc
            texts = pa.concat_tables([read_documents(pa.Table.from_pylist([item]))
                                      for item in self.plan.items_for(buffer)])
            texts = texts.filter(pc.is_in(texts.column("seq"), value_set=pa.array(buffer, pa.int64())))
            if texts.num_rows != len(set(buffer)):
                raise UserError(f"data cursor lists {len(buffer)} buffered documents but only {texts.num_rows} "
                                f"exist in the shards: the cursor does not belong to this data")
            restored = list(_table_documents(tokenize_documents(texts, self.tokenizer_blob, self.bos)))
        documents = self.documents(next_seq)
        packer = _Packer(self.mode, self.seq_len + 1, self.buffer_docs, documents, next_seq, buffered=restored)
        if self.mode == "concat" and offset:
            seq, tokens = packer._pull()
            if offset >= len(tokens):
                raise UserError(f"data cursor offset {offset} is past the end of document {seq} "
                                f"({len(tokens)} tokens): the cursor does not belong to this data/tokenizer")
            packer.head = [seq, tokens, offset]
        return packer

    def run(self, position: dict) -> None:
        import torch
        try:
            packer = self.restore(position)
            while not self.stop.is_set():
                rows = []
                for _ in range(self.batch_size):
                    row = packer.row()
                    if row is None:
                        break
                    rows.append(row)
                if len(rows) < self.batch_size:   # only val ends; a partial last batch is dropped
                    self.put(_END)
                    return
                batch = torch.from_numpy(np.stack(rows))
                self.put((batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), packer.cursor(),
                           packer.cropped_tokens, packer.packed_tokens))
        except BaseException as error:  # handed to the consumer, raised there
            self.put(error)

    def put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue



class PretrainStream:
    """Per-rank iterator of packed `(inputs, targets)` LongTensor batches of shape (batch_size, seq_len).

    `split="train"` cycles through epochs forever; `split="val"` makes one deterministic pass and stops.
    `state_dict()` is a small JSON-serialisable cursor; `PretrainStream(..., cursor=it)` continues exactly
    after the last batch yielded before it was taken. Resuming needs the same rank and world size.
    """

    def __init__(self, cfg, tokenizer, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, cursor: dict | None = None, use_ray: bool = True, download: bool = True):
        if split not in ("train", "val"):
            raise UserError(f"unknown split '{split}': expected 'train' or 'val'")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.use_ray = rank, world_size, use_ray
        self.mode = cfg.data.packing

        paths = shard_paths(cfg, split, download=download)   # training workers: False (the driver fetched them)
        if cursor is not None:
            paths = self._check_cursor(cursor, paths)
        self.plan = DocumentPlan(paths, rank, world_size)
        if self.plan.docs_per_epoch == 0:
            raise UserError(f"rank {rank} of {world_size} gets no {split} documents: the {split} shards have "
                            f"fewer documents per row group than there are ranks")
        producer = _Producer(self.plan, split, self.mode, batch_size, seq_len, cfg.data.buffer_docs,
                             pickle.dumps(tokenizer), tokenizer.get_bos_token_id(), cfg.data.tokenizer_batch_size,
                             cfg.data.prefetch_batches, use_ray, cfg.data.tasks_per_rank, cfg.data.buffer_mb,
                             cfg.data.cache_mb)
        position = cursor or {"next_seq": 0, "offset": 0, "buffer": []}
        self._cursor = self._full_cursor(position)
        self._cropped, self._packed = 0, 0
        self._delivered_tokens, self._started, self._wait_s = 0, None, 0.0
        self._queue, self._stop = producer.queue, producer.stop
        self._thread = threading.Thread(target=producer.run, args=(position,), daemon=True,
                                        name=f"raychat-data-{split}-rank{rank}")
        producer.thread = self._thread
        _PRODUCERS.add(producer)
        self._thread.start()

    # ------------------------------------------------------------------ cursor

    def _full_cursor(self, position: dict) -> dict:
        return {"version": CURSOR_VERSION, "split": self.split, "packing": self.mode, "rank": self.rank,
                "world_size": self.world_size, "shards": [Path(p).name for p in self.plan.paths],
                "epoch": position["next_seq"] // self.plan.docs_per_epoch,
                "next_seq": position["next_seq"], "offset": position["offset"], "buffer": list(position["buffer"])}

    def _check_cursor(self, cursor: dict, paths: list[Path]) -> list[Path]:
        """Refuse a cursor this stream cannot continue exactly; return the shard list it was made with."""
        if not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION:
            raise UserError(f"data cursor is not a version-{CURSOR_VERSION} raychat cursor: {str(cursor)[:80]}")
        try:
            next_seq, offset, buffer = int(cursor["next_seq"]), int(cursor["offset"]), list(cursor["buffer"])
            valid = next_seq >= 0 and offset >= 0 and all(0 <= int(seq) < next_seq for seq in buffer)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"data cursor is damaged (next_seq/offset/buffer): {str(cursor)[:80]}")
        if cursor["world_size"] != self.world_size or cursor["rank"] != self.rank:
            raise UserError(f"data cursor was saved by rank {cursor['rank']} of {cursor['world_size']} workers; "
                            f"this is rank {self.rank} of {self.world_size}: resuming with a different number "
                            f"of workers would replay or skip data (use num_workers={cursor['world_size']})")
        for key, mine in (("split", self.split), ("packing", self.mode)):
            if cursor[key] != mine:
                raise UserError(f"data cursor was saved with {key}={cursor[key]}, this stream uses {key}={mine}")
        by_name = {p.name: p for p in paths}
        missing = [name for name in cursor["shards"] if name not in by_name]
        if missing:
            raise UserError(f"data cursor needs shard(s) {', '.join(missing[:3])} which are not in "
                            f"{paths[0].parent if paths else 'the data directory'}")
        return [by_name[name] for name in cursor["shards"]]

    def state_dict(self) -> dict:
        """The cursor after the last yielded batch (JSON-serialisable; pass it back as `cursor=`)."""
        return {**self._cursor, "buffer": list(self._cursor["buffer"]), "shards": list(self._cursor["shards"])}

    def stats(self) -> dict:
        elapsed = time.perf_counter() - self._started if self._started else 0.0
        total = self._packed + self._cropped
        return {"tokens_per_s": self._delivered_tokens / elapsed if elapsed > 0 else 0.0,
                "cropped_fraction": self._cropped / total if total else 0.0,
                "epoch": self._cursor["epoch"], "wait_s": self._wait_s}

    # ------------------------------------------------------------------ consumer

    def __iter__(self):
        return self

    def __next__(self):
        if self._started is None:
            self._started = time.perf_counter()
        waited = time.perf_counter()
        item = self._queue.get()
        self._wait_s += time.perf_counter() - waited
        if item is _END:
            self._queue.put(_END)   # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        inputs, targets, position, self._cropped, self._packed = item
        self._cursor = self._full_cursor(position)
        self._delivered_tokens += inputs.numel()
        return inputs, targets

    def close(self) -> None:
        """Stop the producer thread (and with it the Ray Data pipeline)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
