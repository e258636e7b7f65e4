"""Stage 1 CLI: `raychat tokenizer train` (train the BPE on the shards) and `raychat tokenizer eval`
(bytes per token on several kinds of text, against other tokenizers)."""
from __future__ import annotations

import json
import socket
import time
from typing import Iterable, Iterator

from raychat.common import UserError, atomic_write, print0, report_dir, tokenizer_dir
from raychat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, get_tokenizer

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
VAL_CHARS = 2_000_000  # characters of the validation shard for bytes/token (enough for 3 significant digits)


def training_texts(cfg, max_chars: int | None = None) -> Iterator[str]:
    """The stage's training text: documents of the train shards cropped to `doc_cap`, up to `max_chars`
    characters in all (the last document is cut to fit)."""
    from raychat.data.fineweb import iter_documents, shard_paths
    budget = cfg.tokenizer.max_chars if max_chars is None else max_chars
    for text in iter_documents(shard_paths(cfg, "train"), doc_cap=cfg.tokenizer.doc_cap):
        if len(text) >= budget:
            yield text[:budget]
            return
        budget -= len(text)
        yield text


def validation_text(cfg, max_chars: int = VAL_CHARS) -> list[str]:
    from raychat.data.fineweb import iter_documents, shard_paths
    docs, total = [], 0
    for text in iter_documents(shard_paths(cfg, "val", download=True), doc_cap=cfg.tokenizer.doc_cap):
        docs.append(text[:max_chars - total])
        total += len(docs[-1])
        if total >= max_chars:
            break
    return docs


def bytes_per_token(encode, texts: Iterable[str]) -> float:
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(encode(text))
    return n_bytes / max(n_tokens, 1)


def _check_vocab(cfg) -> None:
    if cfg.tokenizer.vocab_size < MIN_VOCAB:
        raise UserError(f"tokenizer.vocab_size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                        f"special tokens), got {cfg.tokenizer.vocab_size}")


class _Counter:
    """Counts what passes through an iterator (documents and characters actually read)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.docs, self.chars = texts, 0, 0

    def __iter__(self):
        for text in self.texts:
            self.docs += 1
            self.chars += len(text)
            yield text


def train_main(cfg, args) -> int:
    _check_vocab(cfg)
    tc = cfg.tokenizer
    texts = _Counter(training_texts(cfg))
    print0(f"tokenizer: training a {tc.vocab_size:,}-token BPE on up to {tc.max_chars:,} characters "
           f"(documents cropped to {tc.doc_cap:,})")
    t0 = time.perf_counter()
    tokenizer = RustBPETokenizer.train_from_iterator(texts, tc.vocab_size, num_threads=tc.num_threads, verbose=True)
    train_seconds = time.perf_counter() - t0
    if texts.chars == 0:
        raise UserError("the train shards hold no text: check RAYCHAT_DATA_DIR or run `raychat data download`")
    if texts.chars < tc.max_chars:
        print0(f"tokenizer: note: the train shards hold only {texts.chars:,} of the requested "
               f"{tc.max_chars:,} characters")
    directory = tokenizer.save(tokenizer_dir())
    val = validation_text(cfg)
    stats = {
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": tc.vocab_size,
        "merges": len(tokenizer.merges),
        "train_docs": texts.docs,
        "train_chars": texts.chars,
        "distinct_chunks": tokenizer.train_stats.get("distinct_chunks"),
        "train_seconds": round(train_seconds, 3),
        "count_seconds": round(tokenizer.train_stats.get("count_seconds", 0.0), 3),
        "merge_seconds": round(tokenizer.train_stats.get("merge_seconds", 0.0), 3),
        "val_chars": sum(map(len, val)),
        "val_bytes_per_token": round(bytes_per_token(tokenizer.encode, val), 4),
        "fingerprint": tokenizer.fingerprint(),
        "directory": str(directory),
    }
    report = report_dir()
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(report / "tokenizer.json", json.dumps(stats, indent=2).encode())
    print0(f"tokenizer: {stats['vocab_size']:,} tokens from {texts.chars:,} characters in {train_seconds:.2f}s; "
           f"validation bytes/token {stats['val_bytes_per_token']:.3f}; saved to {directory}")
    return 0


# ------------------------------------------------------------------------------------------------ eval

# Small samples written for this evaluation, one per kind of text the model will meet.
SAMPLES = {
    "prose": (
        "The harbour town woke slowly. Fishing boats that had left before dawn were already coming back, "
        "their decks stacked with crates of mackerel, while the bakery on the corner pushed open its shutters "
        "and the smell of warm bread drifted down to the water. By eight o'clock the market square was full: "
        "farmers from the hills sold cheese and honey, a teacher hurried her class across the cobbles toward "
        "the museum, and two old men argued, as they had every morning for thirty years, about whether the "
        "new lighthouse was an improvement on the old one."
    ),
    "math": (
        "Let f(x) = 3x^2 - 5x + 2. Then f'(x) = 6x - 5, so the minimum is at x = 5/6 and "
        "f(5/6) = 3(25/36) - 25/6 + 2 = -1/12. The roots satisfy x = (5 \\pm \\sqrt{25 - 24})/6, i.e. x = 1 "
        "or x = 2/3. For the integral, \\int_0^1 f(x)\\,dx = [x^3 - 5x^2/2 + 2x]_0^1 = 1/2. "
        "A train travels 180 km in 2.5 hours: its average speed is 180 / 2.5 = 72 km/h. "
        "If 12% of 450 students walk to school, 0.12 * 450 = 54 students walk. "
        "\\sum_{k=1}^{n} k^2 = n(n+1)(2n+1)/6, so for n = 10 the sum is 385."
    ),
    "non-English": (
        "Der schnelle Wandel der Städte verändert, wie Menschen wohnen und arbeiten. "
        "La biblioteca municipal abrirá sus puertas el lunes con una colección renovada de libros infantiles. "
        "Les chercheurs ont observé que les abeilles reconnaissent des visages humains. "
        "Сегодня в городе ожидается сильный дождь и порывистый ветер до вечера. "
        "今天的天气很好，我们一起去公园散步吧。这个城市的历史非常悠久。 "
        "오늘 회의는 오후 세 시에 시작합니다. 자료를 미리 읽어 주세요. "
        "東京の電車はとても正確で、毎朝たくさんの人が利用しています。 "
        "يحب الأطفال اللعب في الحديقة بعد المدرسة. "
        "Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός όλη την ημέρα."
    ),
}


def _code_sample() -> str:
    """Real Python source that exists wherever raychat runs: two modules of the standard library."""
    import inspect
    import json as json_module
    import textwrap
    return inspect.getsource(textwrap) + inspect.getsource(json_module)


def _hf_baseline(texts: Iterable[str], vocab_size: int):
    """A HF `tokenizers` byte-level BPE with the same split pattern and number of merges, trained on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  min_frequency=0, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _openai_encodings() -> dict:
    """GPT-2 / GPT-4 encodings when tiktoken can load them (cached files or internet); skipped otherwise."""
    import tiktoken
    found = {}
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        for label, name in (("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")):
            try:
                found[label] = tiktoken.get_encoding(name).encode_ordinary
            except Exception as e:  # offline: no cached file and no network
                print0(f"tokenizer eval: {label} encoding not available ({type(e).__name__}); skipped")
    finally:
        socket.setdefaulttimeout(previous)
    return found


def eval_main(cfg, args) -> int:
    _check_vocab(cfg)
    tokenizer = get_tokenizer()
    hf_chars = min(cfg.tokenizer.max_chars, cfg.tokenizer.eval_hf_chars)
    kinds = {**SAMPLES, "code": _code_sample(), "fineweb-val": validation_text(cfg)}
    kinds = {k: ([v] if isinstance(v, str) else v) for k, v in kinds.items()}
    print0(f"tokenizer eval: training the HF tokenizers baseline on {hf_chars:,} characters of the same text")
    encoders = {"raychat": tokenizer.encode,
                "HF BPE": _hf_baseline(training_texts(cfg, hf_chars), tokenizer.get_vocab_size())}
    encoders.update(_openai_encodings())
    table = {kind: {name: bytes_per_token(enc, texts) for name, enc in encoders.items()}
             for kind, texts in kinds.items()}
    names = list(encoders)
    print0(f"bytes per token (higher = better compression); raychat vocab {tokenizer.get_vocab_size():,}")
    print0(f"{'text':<14}" + "".join(f"{n:>12}" for n in names) + "".join(f"{'vs ' + n:>12}" for n in names[1:]))
    for kind, row in table.items():
        ratios = "".join(f"{100 * (row['raychat'] / row[n] - 1):>+11.1f}%" for n in names[1:])
        print0(f"{kind:<14}" + "".join(f"{row[n]:>12.3f}" for n in names) + ratios)
    report = report_dir()
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(report / "tokenizer_eval.json",
                json.dumps({"vocab_size": tokenizer.get_vocab_size(), "bytes_per_token": table}, indent=2).encode())
    return 0
