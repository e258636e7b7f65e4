"""Tokenizer training benchmark: raychat's Rust trainer vs rustbpe (nanochat's trainer) vs HF `tokenizers`.

    RAYCHAT_DATA_DIR=../shared/data flock /tmp/raychat_cpu.lock python bench/tokenizer.py [--repeats 3]

Two corpora, documents cropped to 10,000 characters:
  shards     the offline FineWeb-EDU/FineWeb/C4 training shards (~10 M characters): splitting and counting
             dominate.
  generated  >= 200 M characters of sentences drawn from the 370 k-word list in ../shared/data/words with a
             Zipf (long-tail) distribution, capitalisation and punctuation: many distinct words, so the merge
             loop dominates. Built once with a fixed seed and cached in bench/results/.

Every trainer learns the same number of merges (vocab 32,768 and 65,536 for raychat = vocab - 9 for the
others, which have no special tokens) from the same Python list of strings, each run in a fresh process;
the time is the best of --repeats runs of the training call alone (raychat builds its tiktoken Encoding
on first use, as nanochat builds one from rustbpe's ranks after training: neither is timed), peak memory
is the process's peak RSS (corpus included, the same for all). Bytes/token is measured on the validation shard. Finally the encode
throughput of the tiktoken path (what the pretraining data pipeline uses) is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOC_CAP = 10_000


def data_dir() -> Path:
    root = os.environ.get("RAYCHAT_DATA_DIR")
    if not root:
        sys.exit("set RAYCHAT_DATA_DIR to the offline datasets (../shared/data)")
    return Path(root)


def shard_texts(split: str = "train") -> list[str]:
    import pyarrow.parquet as pq
    paths = sorted((data_dir() / "pretrain" / "shards").glob("*.parquet"))
    paths = paths[:-1] if split == "train" else paths[-1:]
    return [t[:DOC_CAP] for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]


def generated_path(total_chars: int) -> Path:
    return RESULTS / f"generated_{total_chars // 1_000_000}M.parquet"


def build_generated(total_chars: int, seed: int = 0) -> Path:
    """Sentences of Zipf-distributed words (short words are the frequent ones, as in real text)."""
    import gzip

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = generated_path(total_chars)
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    with gzip.open(data_dir() / "words" / "words_alpha.txt.gz", "rt") as f:
        words = [w.strip() for w in f if w.strip()]
    # frequency rank: mostly by length, with noise, so that frequent words tend to be short
    order = np.argsort(np.array([len(w) for w in words]) + rng.normal(0, 3, len(words)))
    words = [words[i] for i in order]
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks ** 1.05
    p /= p.sum()
    # each word in 5 spellings: plain, Capitalised, with a comma, with a period, with a number after it
    variants = np.array([v for w in words for v in (w, w.capitalize(), w + ",", w + ".", f"{w} {len(w) * 37}")],
                        dtype=object)
    variant_p = np.array([0.82, 0.08, 0.05, 0.04, 0.01])
    n_words = int(total_chars / 5.0) + 1  # more than enough: the loop below stops at total_chars
    chosen = rng.choice(len(words), size=n_words, p=p) * 5 + rng.choice(5, size=n_words, p=variant_p)
    tokens = variants[chosen].tolist()
    docs, i, total = [], 0, 0
    while total < total_chars and i < len(tokens):
        n = int(rng.integers(300, 1400))
        paragraph = int(rng.integers(40, 200))
        doc = "\n\n".join(" ".join(tokens[j:j + paragraph]) for j in range(i, min(i + n, len(tokens)), paragraph))
        docs.append(doc[:DOC_CAP])
        total += len(docs[-1])
        i += n
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"text": docs}), tmp)
    os.replace(tmp, path)
    return path


def load_corpus(name: str, total_chars: int) -> list[str]:
    if name == "shards":
        return shard_texts("train")
    import pyarrow.parquet as pq
    return pq.read_table(build_generated(total_chars), columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------- trainers

def train_raychat(texts: list[str], vocab: int):
    from raychat.tokenizer import RustBPETokenizer
    tok = RustBPETokenizer.train_from_iterator(texts, vocab)
    return lambda batch: [len(ids) for ids in tok.encode(batch, num_threads=2)]


def train_rustbpe(texts: list[str], vocab: int):
    import rustbpe
    import tiktoken

    from raychat.tokenizer import SPLIT_PATTERN
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab - 9, pattern=SPLIT_PATTERN)

    def count(batch):  # encoded the way nanochat does: a tiktoken Encoding from rustbpe's ranks
        ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
        return [len(ids) for ids in enc.encode_ordinary_batch(batch, num_threads=2)]
    return count


def train_hf(texts: list[str], vocab: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from raychat.tokenizer import SPLIT_PATTERN
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 9, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return lambda batch: [len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False)]


TRAINERS = {"raychat": train_raychat, "rustbpe": train_rustbpe, "HF tokenizers": train_hf}


def worker(trainer: str, corpus: str, vocab: int, total_chars: int) -> None:
    """One training run in this (fresh) process; prints a JSON line."""
    texts = load_corpus(corpus, total_chars)
    t0 = time.perf_counter()
    count_tokens = TRAINERS[trainer](texts, vocab)
    seconds = time.perf_counter() - t0
    # VmHWM: the peak of this process alone (ru_maxrss would include the parent's peak after fork + exec)
    peak_mib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) / 1024
    val = shard_texts("val")
    n_tokens = sum(count_tokens(val))
    n_bytes = sum(len(t.encode()) for t in val)
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "bytes_per_token": n_bytes / n_tokens,
                      "chars": sum(map(len, texts))}))


def run_worker(trainer: str, corpus: str, vocab: int, total_chars: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", trainer, corpus, str(vocab), str(total_chars)],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- encode

def encode_throughput(repeats: int) -> dict:
    """MB/s of tiktoken encoding with a raychat vocab-32768 tokenizer trained on the shards."""
    from raychat.tokenizer import RustBPETokenizer
    texts = shard_texts("train")
    tok = RustBPETokenizer.train_from_iterator(texts, 32768)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    results = {}
    for label, fn in (("1 thread", lambda: [tok.encode(t) for t in texts]),
                      ("batch, 2 threads", lambda: tok.encode(texts, num_threads=2))):
        best = min(_timed(fn) for _ in range(repeats))
        results[label] = mb / best
    return results


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", choices=["shards", "generated", "all"], default="all")
    parser.add_argument("--vocab", default="32768,65536")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--generated-chars", type=int, default=200_000_000)
    parser.add_argument("--hf-repeats-generated", type=int, default=1,
                        help="HF tokenizers takes minutes on the generated corpus: fewer runs there")
    parser.add_argument("--worker", nargs=4, metavar=("TRAINER", "CORPUS", "VOCAB", "CHARS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trainer, corpus, vocab, chars = args.worker
        worker(trainer, corpus, int(vocab), int(chars))
        return
    corpora = ["shards", "generated"] if args.corpus == "all" else [args.corpus]
    if "generated" in corpora:
        t0 = time.perf_counter()
        path = build_generated(args.generated_chars)
        print(f"generated corpus: {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    trainers = args.trainers.split(",")
    results = []
    for corpus in corpora:
        for vocab in map(int, args.vocab.split(",")):
            row = {"corpus": corpus, "vocab": vocab}
            for trainer in trainers:
                repeats = args.hf_repeats_generated if (trainer == "HF tokenizers" and corpus == "generated") \
                    else args.repeats
                runs = [run_worker(trainer, corpus, vocab, args.generated_chars) for _ in range(repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                row[trainer] = {**best, "runs": [round(r["seconds"], 3) for r in runs],
                                "peak_mib": max(r["peak_mib"] for r in runs)}
                times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
                print(f"{corpus:>9} vocab {vocab:>6} {trainer:>14}: {best['seconds']:8.3f}s (runs "
                      f"{times}), peak {row[trainer]['peak_mib']:,.0f} MiB, "
                      f"{best['bytes_per_token']:.4f} bytes/token, corpus {best['chars']:,} chars", flush=True)
            results.append(row)
    print()
    print(f"{'corpus':>9} {'vocab':>6} " + "".join(f"{t:>15}" for t in trainers) +
          "".join(f"{'vs ' + t:>18}" for t in trainers[1:]) + "   bytes/token vs rustbpe")
    for row in results:
        ours = row[trainers[0]]
        speedups = "".join(f"{row[t]['seconds'] / ours['seconds']:>17.2f}x" for t in trainers[1:])
        bpt = ""
        if "rustbpe" in row:
            bpt = f"   {100 * (ours['bytes_per_token'] / row['rustbpe']['bytes_per_token'] - 1):+.3f}%"
        print(f"{row['corpus']:>9} {row['vocab']:>6} " + "".join(f"{row[t]['seconds']:>14.3f}s" for t in trainers) +
              speedups + bpt)
    enc = encode_throughput(args.repeats)
    print("\ntiktoken encode (raychat vocab 32,768, shards): " +
          ", ".join(f"{label}: {v:.1f} MB/s" for label, v in enc.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenizer.json").write_text(json.dumps({"training": results, "encode_mb_s": enc}, indent=2))


if __name__ == "__main__":
    main()
