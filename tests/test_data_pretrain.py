"""PretrainStream: exact resume from a cursor, packing invariants, the validation pass, Ray == plain iterator.

The streams read a small corpus cut from the offline shards (2 train shards of 5 row groups, a val shard),
so that an epoch boundary is reached in a few dozen batches.
"""
import gc
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raychat.common import UserError
from raychat.config import load_config
from raychat.data.fineweb import iter_documents, shard_paths
from raychat.data.pretrain import PretrainStream

B, T = 4, 48


@pytest.fixture(scope="module")
def small_corpus(data_dir, tmp_path_factory):
    """RAYCHAT_DATA_DIR layout with 2 x 40 train documents (row groups of 8) and 20 val documents, each a
    real document cut to a different length (7 to ~250 tokens), so best-fit has choices to make."""
    root = tmp_path_factory.mktemp("corpus")
    shards = root / "pretrain" / "shards"
    shards.mkdir(parents=True)
    source = iter_documents(sorted((data_dir / "pretrain" / "shards").glob("shard_*.parquet")))
    for index, (count, group) in enumerate([(40, 8), (40, 8), (20, 20)]):
        texts = [next(source)[: 20 + (i * 97 + index * 31) % 700] for i in range(count)]
        pq.write_table(pa.table({"text": texts}), shards / f"shard_{index:05d}.parquet", row_group_size=group)
    return root


@pytest.fixture
def cfg(small_corpus, monkeypatch):
    monkeypatch.setenv("RAYCHAT_DATA_DIR", str(small_corpus))
    return load_config("demo", ["data.buffer_docs=8", "data.tokenizer_batch_size=5"])


def digest(batch):
    inputs, targets = batch
    return hashlib.sha1(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()


def run(stream, n):
    """(digests, cursors after each batch) of the next n batches, cursors round-tripped through JSON."""
    digests, cursors = [], []
    for _ in range(n):
        digests.append(digest(next(stream)))
        cursors.append(json.loads(json.dumps(stream.state_dict())))
    return digests, cursors


@pytest.mark.parametrize("packing", ["concat", "bos_bestfit"])
def test_resume_from_cursor_is_exact(cfg, tokenizer, packing):
    cfg.data.packing = packing
    for rank in range(2):
        with PretrainStream(cfg, tokenizer, "train", B, T, rank=rank, world_size=2, use_ray=False) as stream:
            reference, cursors = run(stream, 24)
            epochs = [c["epoch"] for c in cursors]
            while epochs[-1] == 0 or len(epochs) - epochs.index(1) < 6:   # run past the epoch boundary
                more, more_cursors = run(stream, 8)
                reference += more
                cursors += more_cursors
                epochs = [c["epoch"] for c in cursors]
        boundary = epochs.index(1) + 1   # batches before the first cursor that points into epoch 1
        assert len(set(reference[:boundary])) == boundary   # sanity: no batch repeats within an epoch
        for k in (3, boundary - 1, boundary):          # mid-shard, just before and at the epoch boundary
            assert cursors[k - 1]["next_seq"] > 0
            with PretrainStream(cfg, tokenizer, "train", B, T, rank=rank, world_size=2,
                                cursor=cursors[k - 1], use_ray=False) as resumed:
                # same batches, and the same positions (epochs repeat, so equal batches alone could hide
                # a resume one epoch off)
                assert run(resumed, 5) == (reference[k:k + 5], cursors[k:k + 5]), f"rank {rank}, after {k}"


def test_concat_delivers_every_token_once_per_epoch(cfg, tokenizer):
    cfg.data.packing = "concat"
    bos = tokenizer.get_bos_token_id()
    corpus = [tuple([bos] + ids) for ids in tokenizer.encode(list(iter_documents(shard_paths(cfg))))]
    delivered = []
    for rank in range(2):
        with PretrainStream(cfg, tokenizer, "train", B, T, rank=rank, world_size=2, use_ray=False) as stream:
            tokens, last = [], 0
            while last < 2:   # up to the batch that reaches epoch 1, and one more
                last += stream.state_dict()["epoch"] > 0
                inputs, targets = next(stream)
                assert (inputs[:, 1:] == targets[:, :-1]).all()              # targets are inputs shifted by one
                rows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)   # the T+1 row
                tokens.extend(rows.reshape(-1).tolist())
            docs_per_epoch = stream.plan.docs_per_epoch
        starts = [i for i, token in enumerate(tokens) if token == bos] + [len(tokens)]
        docs = [tuple(tokens[a:b]) for a, b in zip(starts, starts[1:])]
        delivered += docs[:docs_per_epoch]
        # the epoch ends exactly after this rank's share, then the share starts again from its first document
        assert len(docs) > docs_per_epoch and docs[0][:len(docs[docs_per_epoch])] == docs[docs_per_epoch]
    assert sorted(delivered) == sorted(corpus)   # across the 2 ranks: every document, every token, once


def test_bestfit_rows_start_with_bos_and_hold_whole_or_cropped_documents(cfg, tokenizer):
    cfg.data.packing = "bos_bestfit"
    bos = tokenizer.get_bos_token_id()
    corpus = [[bos] + ids for ids in tokenizer.encode(list(iter_documents(shard_paths(cfg))))]
    whole = {tuple(doc) for doc in corpus}
    prefixes = {tuple(doc[:n]) for doc in corpus for n in range(1, len(doc) + 1)}
    with PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=1, use_ray=False) as stream:
        batches = [next(stream) for _ in range(30)]
        stats = stream.stats()
    segments = 0
    for inputs, targets in batches:
        rows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)
        assert (rows[:, 0] == bos).all()
        for row in rows.tolist():
            starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            # every document but the last of a row is placed whole; the last may be cropped to fill the row
            assert all(piece in whole for piece in pieces[:-1]) and pieces[-1] in prefixes
            segments += len(pieces)
    assert segments > len(batches) * B               # rows do pack several documents
    assert 0 < stats["cropped_fraction"] < 1 and stats["tokens_per_s"] > 0


def test_val_is_one_deterministic_pass(cfg, tokenizer):
    cfg.data.packing = "concat"
    val_tokens = sum(len(ids) + 1 for ids in tokenizer.encode(list(iter_documents(shard_paths(cfg, "val")))))
    passes = []
    for _ in range(2):
        with PretrainStream(cfg, tokenizer, "val", B, T, use_ray=False) as stream:
            passes.append([digest(batch) for batch in stream])
            with pytest.raises(StopIteration):
                next(stream)
    assert passes[0] == passes[1]
    assert len(passes[0]) == val_tokens // (B * (T + 1))   # one pass, the partial last batch dropped
    # a pass abandoned half-way (eval reads a token budget) must not leave its producer thread running
    stream = PretrainStream(cfg, tokenizer, "val", B, T, use_ray=False)
    next(stream)
    thread = stream._thread
    del stream
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_cursor_mismatches_are_refused(cfg, tokenizer):
    cfg.data.packing = "bos_bestfit"
    with PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=2, use_ray=False) as stream:
        next(stream)
        cursor = stream.state_dict()
    with pytest.raises(UserError, match="rank 0 of 2 workers.*different number of workers"):
        PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=4, cursor=cursor, use_ray=False)
    with pytest.raises(UserError, match="split=train"):
        PretrainStream(cfg, tokenizer, "val", B, T, rank=0, world_size=2, cursor=cursor, use_ray=False)
    with pytest.raises(UserError, match="missing|not in"):
        PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=2, use_ray=False,
                       cursor={**cursor, "shards": ["shard_00042.parquet"]})
    with pytest.raises(UserError, match="not a version-1 raychat cursor"):
        PretrainStream(cfg, tokenizer, "train", B, T, cursor={"step": 3}, use_ray=False)
    with pytest.raises(UserError, match="damaged"):
        PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=2, use_ray=False,
                       cursor={**cursor, "buffer": [cursor["next_seq"] + 5]})
    with pytest.raises(UserError, match="rank 2 is outside world_size 2"):
        PretrainStream(cfg, tokenizer, "train", B, T, rank=2, world_size=2, use_ray=False)
    with pytest.raises(UserError, match="gets no val documents"):   # 20 val documents, 32 ranks
        PretrainStream(cfg, tokenizer, "val", B, T, rank=0, world_size=32, use_ray=False)
    cfg.data.packing = "concat"
    with pytest.raises(UserError, match="packing=bos_bestfit"):
        PretrainStream(cfg, tokenizer, "train", B, T, rank=0, world_size=2, cursor=cursor, use_ray=False)


@pytest.mark.parametrize("packing", ["concat", "bos_bestfit"])
def test_ray_data_stream_equals_plain_iterator(cfg, tokenizer, ray_cluster, packing):
    """Every data path yields the batches of the plain iterator that tokenizes every epoch again (the
    reference): the plain iterator and the Ray Data stream serving a small share from its tokens cached
    once, and the Ray Data stream tokenizing in chunks; also across an epoch boundary, across Ray Data
    chunks (8 work items of 4 documents with 1 task; an epoch of this share is 10), and when rebuilt
    from a cursor."""
    cfg.data.packing, cfg.data.tasks_per_rank, cfg.data.cache_mb = packing, 1, 0
    with PretrainStream(cfg, tokenizer, "train", B, T, rank=1, world_size=2, use_ray=False) as plain:
        reference, cursors = run(plain, 40)
    assert cursors[-1]["epoch"] >= 1
    k = next(i for i, c in enumerate(cursors) if c["epoch"] == 1) - 2   # resume just before the boundary
    for use_ray, cache_mb in ((False, 64), (True, 64), (True, 0)):
        cfg.data.cache_mb = cache_mb
        with PretrainStream(cfg, tokenizer, "train", B, T, rank=1, world_size=2, use_ray=use_ray) as stream:
            assert run(stream, 40) == (reference, cursors), (use_ray, cache_mb)
        if use_ray:
            with PretrainStream(cfg, tokenizer, "train", B, T, rank=1, world_size=2, cursor=cursors[k],
                                use_ray=True) as resumed:
                assert run(resumed, 6) == (reference[k + 1:k + 7], cursors[k + 1:k + 7]), cache_mb


def test_process_exits_cleanly_with_a_stream_still_producing(cfg, tokenizer, small_corpus, tmp_path):
    """A trainer never closes its train stream; the producer thread must not abort the interpreter at exit."""
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tokenizer))
    script = (
        "import pickle, sys\n"
        "from raychat.config import load_config\n"
        "from raychat.data.pretrain import PretrainStream\n"
        f"tok = pickle.load(open({str(tmp_path / 'tok.pkl')!r}, 'rb'))\n"
        "cfg = load_config('demo', ['data.packing=concat', 'data.prefetch_batches=64'])\n"
        "stream = PretrainStream(cfg, tok, 'train', 4, 48, use_ray=False)\n"
        "next(stream)\n")
    env = {**os.environ, "RAYCHAT_DATA_DIR": str(small_corpus)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr
