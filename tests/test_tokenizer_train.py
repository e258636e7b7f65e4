"""The Rust BPE trainer: merge-for-merge equality with a pure-Python reference and with rustbpe, determinism
across threads and batch sizes, bounded memory, and the `raychat tokenizer train|eval` stage."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import regex

from raychat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, train_merges

REPO = Path(__file__).resolve().parent.parent


def shard_texts(data_dir: Path, split="train", doc_cap=10_000) -> list[str]:
    paths = sorted((data_dir / "pretrain" / "shards").glob("*.parquet"))
    paths = paths[:-1] if split == "train" else paths[-1:]
    return [t[:doc_cap] for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]


def reference_bpe(texts: list[str], num_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE, slow and obvious: recount every pair after each merge; the highest count wins, ties go
    to the smallest (left, right) pair; merges replace non-overlapping occurrences left to right."""
    chunks = Counter(chunk for text in texts for chunk in regex.findall(SPLIT_PATTERN, text))
    words = [(list(chunk.encode()), n) for chunk, n in chunks.items()]
    merges = []
    for new_id in range(256, 256 + num_merges):
        pairs = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for ids, _ in words:
            i, out = 0, []
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids[:] = out
    return merges


def test_merges_equal_reference_bpe(data_dir):
    # real text plus runs that exercise overlapping pairs (aaaa, abab) and multi-byte characters
    texts = [t[:3000] for t in shard_texts(data_dir)[:6]]
    texts += ["aaaa aaaaa aaa aa a aaaaaaa", "abababab ababa bababab", "ééé ééé 你好你好你好 🎉🎉🎉", "1111 2222 11 22"]
    merges, stats = train_merges(texts, 400, num_threads=2)
    assert merges == reference_bpe(texts, 400)
    assert stats["docs"] == len(texts) and stats["chars"] == sum(map(len, texts))


def test_runs_out_of_pairs():
    merges, _ = train_merges(["ab ab ab"], 100)
    assert merges == reference_bpe(["ab ab ab"], 100) and len(merges) == 2  # "ab", " ab"
    tok = RustBPETokenizer.train_from_iterator(["ab ab ab"], 300)
    assert tok.get_vocab_size() == 256 + 2 + len(SPECIAL_TOKENS)
    assert tok.decode(tok.encode("ab abc")) == "ab abc"


def test_merges_equal_rustbpe_at_vocab_32768(data_dir):
    """nanochat's trainer (rustbpe) on the offline training shards: the same 32,759 tokens, rank for rank."""
    rustbpe = pytest.importorskip("rustbpe")
    texts = shard_texts(data_dir)
    ours = RustBPETokenizer.train_from_iterator(texts, 32768)
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(texts), 32768 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = sorted(((rank, bytes(token)) for token, rank in theirs.get_mergeable_ranks()))
    assert len(ranks) == 32759 == len(ours._tokens)
    assert [token for _, token in ranks] == ours._tokens


def test_same_merges_with_any_threads_and_batch_size(data_dir):
    texts = shard_texts(data_dir)[:400]
    expected, _ = train_merges(texts, 1500, num_threads=1)
    for threads, buffer_bytes in ((2, 64 * 2**20), (3, 100_000), (7, 1_000_000)):
        merges, _ = train_merges(texts, 1500, num_threads=threads, buffer_bytes=buffer_bytes)
        assert merges == expected, (threads, buffer_bytes)


def test_bad_input():
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        RustBPETokenizer.train_from_iterator(["hello"], 264)
    with pytest.raises(TypeError, match="must be str"):
        train_merges(["ok", b"bytes"], 10)
    # lone surrogates cannot be UTF-8: they are trained on as U+FFFD instead of failing
    tok = RustBPETokenizer(train_merges(["a\ud800b a\ud800b"], 10)[0])
    assert "\ufffdb".encode() in tok._tokens and tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


MEMORY_SCRIPT = r"""
import random, resource, sys
from raychat.tokenizer import train_merges
total = int(sys.argv[1])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 9))) for _ in range(3000)]
docs = [" ".join(rng.choice(words) for _ in range(20000)) for _ in range(20)]   # ~2 MB each, built once

def stream():
    produced = 0
    while produced < total:
        for doc in docs:
            yield doc
            produced += len(doc)
import gc; gc.collect()
with open("/proc/self/statm") as f:  # resident pages now, so the peak below is what training added
    before_kib = int(f.read().split()[1]) * resource.getpagesize() // 1024
merges, stats = train_merges(stream(), 500, buffer_bytes=4 * 2**20)
# VmHWM, not ru_maxrss: after fork + exec ru_maxrss still includes the parent's (pytest's) peak
peak_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
print(stats["chars"], peak_kib - before_kib)
"""


def test_memory_is_bounded_by_distinct_chunks():
    """Training on 10x more text of the same vocabulary must not need more memory."""
    def run(total_chars: int) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(total_chars)], check=True,
                             capture_output=True, text=True).stdout.split()
        return int(out[0]), int(out[1]) * 1024

    small_chars, small_peak = run(20_000_000)
    big_chars, big_peak = run(200_000_000)
    assert big_chars >= 9 * small_chars
    assert 0 < small_peak < 200 * 2**20
    assert big_peak - small_peak < 24 * 2**20, (small_peak, big_peak)


# ------------------------------------------------------------------------------------------- stage CLI

def run_cli(args, base_dir: Path, data_dir: Path):
    env = {**os.environ, "RAYCHAT_BASE_DIR": str(base_dir), "RAYCHAT_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "raychat.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_stage_train_and_eval(tmp_path, data_dir):
    result = run_cli(["tokenizer", "train", "--preset", "demo", "--set", "tokenizer.vocab_size=600",
                      "--set", "tokenizer.max_chars=300000"], tmp_path, data_dir)
    assert result.returncode == 0, result.stderr
    assert "merges 335/335" in result.stderr  # progress output of the Rust trainer
    stats = json.loads((tmp_path / "report" / "tokenizer.json").read_text())
    assert stats["vocab_size"] == 600 and stats["train_chars"] == 300_000 and stats["merges"] == 335
    assert 2.0 < stats["val_bytes_per_token"] < 5.0
    tok = RustBPETokenizer.from_directory(tmp_path / "tokenizer")
    assert tok.fingerprint() == stats["fingerprint"]
    # same text (the first 300k characters of the train shards, documents cropped to 10k) as the stage used
    texts, budget = [], 300_000
    for text in shard_texts(data_dir):
        texts.append(text[:budget])
        budget -= len(texts[-1])
        if budget == 0:
            break
    assert tok.merges == train_merges(texts, 335)[0]

    result = run_cli(["tokenizer", "eval", "--preset", "demo", "--set", "tokenizer.vocab_size=600",
                      "--set", "tokenizer.max_chars=300000"], tmp_path, data_dir)
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "report" / "tokenizer_eval.json").read_text())["bytes_per_token"]
    assert set(table) == {"prose", "math", "non-English", "code", "fineweb-val"}
    for kind, row in table.items():
        assert 1.0 <= row["raychat"] < 6.0 and row["HF BPE"] > 1.0, (kind, row)
    assert "fineweb-val" in result.stdout


def test_stage_errors(tmp_path, data_dir):
    result = run_cli(["tokenizer", "train", "--preset", "demo", "--set", "tokenizer.vocab_size=100"], tmp_path,
                     data_dir)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "tokenizer.vocab_size" in result.stderr
    empty = tmp_path / "empty"
    (empty / "pretrain" / "shards").mkdir(parents=True)
    result = run_cli(["tokenizer", "train", "--preset", "demo"], tmp_path, empty)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "shard" in result.stderr
    result = run_cli(["tokenizer", "eval", "--preset", "demo"], tmp_path / "fresh", data_dir)
    assert result.returncode == 2 and "run `raychat tokenizer train` first" in result.stderr
