"""The BPE tokenizer: trained by the Rust extension (tokenizer_rust/, module `raychat_bpe`), encoded by tiktoken.

Token ids: 0-255 are the bytes, 256.. are the learned merges in the order they were learned, and the 9 special
tokens come last. User text is always encoded with `encode_ordinary`, so it can never produce a special token.

A tokenizer directory holds `bpe.json` (pattern, merges, special tokens, fingerprint), `token_bytes.pt`
(UTF-8 bytes per token, for bits-per-byte) and `tokenizer.json` (the same tokenizer for HF `tokenizers`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Iterable

import tiktoken

from raychat.common import UserError, atomic_write, fsync_file, get_logger, replace_directory, tokenizer_dir

# GPT-4's split pattern, with numbers grouped by 1-2 digits instead of 1-3 (nanochat: better for small vocabularies)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

FORMAT_VERSION = 1
BPE_FILE, TOKEN_BYTES_FILE, HF_FILE = "bpe.json", "token_bytes.pt", "tokenizer.json"

log = get_logger()


# ----------------------------------------------------------------------------------------- Rust side

def _native():
    try:
        import raychat_bpe
    except ImportError:
        raise UserError("the Rust tokenizer extension `raychat_bpe` is not installed: run `make install` "
                        "(or `pip install ./tokenizer_rust`)") from None
    return raychat_bpe


def _check(status: int) -> int:
    if status < 0:
        native = _native()
        size = native.lib.rbpe_last_error(native.ffi.NULL, 0)
        buf = native.ffi.new("uint8_t[]", size + 1)
        native.lib.rbpe_last_error(buf, size)
        raise ValueError(native.ffi.string(native.ffi.cast("char *", buf)).decode("utf-8", "replace"))
    return status


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates become U+FFFD, as tiktoken does
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def split_text(text: str) -> list[str]:
    """The chunks of `text` under SPLIT_PATTERN, from the Rust pre-tokenizer (used to test it against `regex`)."""
    native = _native()
    data = _utf8(text)
    cap = len(data) + 1
    ends = native.ffi.new("uint64_t[]", cap)
    n = _check(native.lib.rbpe_split(native.ffi.from_buffer("uint8_t[]", data), len(data), ends, cap))
    chunks, start = [], 0
    for end in ends[0:n]:
        chunks.append(data[start:end].decode("utf-8"))
        start = end
    return chunks


def train_merges(texts: Iterable[str], num_merges: int, num_threads: int = 0, buffer_bytes: int = 64 * 2**20,
                 verbose: bool = False) -> tuple[list[tuple[int, int]], dict]:
    """Learn up to `num_merges` byte-pair merges from `texts`. Returns (merges, stats).

    Texts are packed into buffers of ~`buffer_bytes` UTF-8 bytes; the Rust side counts the chunks of one
    buffer on all cores while Python fills the next, so memory stays at two buffers plus the distinct chunks.
    """
    native = _native()
    ffi, lib = native.ffi, native.lib
    trainer = ffi.gc(lib.rbpe_trainer_new(num_threads), lib.rbpe_trainer_free)
    stats = {"docs": 0, "chars": 0, "bytes": 0}
    t0 = time.perf_counter()

    def feed(parts: list[bytes], offsets: array) -> None:
        data = b"".join(parts)
        _check(lib.rbpe_trainer_feed(trainer, ffi.from_buffer("uint8_t[]", data), len(data),
                                     ffi.from_buffer("uint64_t[]", offsets), len(offsets) - 1))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        parts, offsets, size = [], array("Q", [0]), 0
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"training texts must be str, got {type(text).__name__}")
            data = _utf8(text)
            parts.append(data)
            size += len(data)
            offsets.append(size)
            stats["docs"] += 1
            stats["chars"] += len(text)
            if size >= buffer_bytes:
                if pending is not None:
                    pending.result()
                pending = pool.submit(feed, parts, offsets)
                stats["bytes"] += size
                parts, offsets, size = [], array("Q", [0]), 0
        if pending is not None:
            pending.result()
        if parts:
            feed(parts, offsets)
            stats["bytes"] += size
    stats["count_seconds"] = time.perf_counter() - t0
    stats["chunks"] = lib.rbpe_trainer_num_chunks(trainer)
    stats["distinct_chunks"] = lib.rbpe_trainer_num_distinct_chunks(trainer)
    t1 = time.perf_counter()
    done = _check(lib.rbpe_trainer_train(trainer, num_merges, int(verbose)))
    stats["merge_seconds"] = time.perf_counter() - t1
    out = ffi.new("uint32_t[]", 2 * done + 1)
    lib.rbpe_trainer_merges(trainer, out, ffi.NULL)
    flat = list(out[0:2 * done])
    merges = list(zip(flat[0::2], flat[1::2]))
    stats["merges"] = done
    return merges, stats


# ------------------------------------------------------------------------------------------ tokenizer

def _token_bytes_from_merges(merges: list[tuple[int, int]]) -> list[bytes]:
    tokens = [bytes([i]) for i in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    return tokens


def _resolve_token(tokenizer: "RustBPETokenizer", token: int | str) -> int:
    if isinstance(token, str):
        return tokenizer.encode_special(token)
    if not 0 <= token < tokenizer.get_vocab_size():
        raise ValueError(f"token id {token} is outside the vocabulary (0..{tokenizer.get_vocab_size() - 1})")
    return int(token)


class RustBPETokenizer:
    """Byte-level BPE with GPT-4-style splitting and 9 special tokens (the last ids of the vocabulary)."""

    def __init__(self, merges: list[tuple[int, int]], pattern: str = SPLIT_PATTERN, name: str = "raychat"):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.name = name
        self._tokens = _token_bytes_from_merges(self.merges)
        n = len(self._tokens)
        self.special_tokens = {name_: n + i for i, name_ in enumerate(SPECIAL_TOKENS)}
        self.train_stats: dict = {}

    @cached_property
    def enc(self) -> tiktoken.Encoding:
        """The tiktoken Encoding that does all encoding and decoding (built on first use: training and
        saving do not need it)."""
        ranks = {}
        for rank, token in enumerate(self._tokens):
            # the same bytes can in principle be learned twice (from two different splits); tiktoken keeps
            # the first (lowest) rank, which is the one BPE reaches first anyway
            ranks.setdefault(token, rank)
        if len(ranks) != len(self._tokens):
            log.warning("tokenizer: %d merges repeat an earlier token's bytes", len(self._tokens) - len(ranks))
        return tiktoken.Encoding(name=self.name, pat_str=self.pattern, mergeable_ranks=ranks,
                                 special_tokens=self.special_tokens)

    # ---------------------------------------------------------------------------- training / storage
    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, num_threads: int = 0,
                            verbose: bool = False) -> "RustBPETokenizer":
        """Train on an iterator of strings. `vocab_size` counts the 256 bytes and the 9 special tokens."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        merges, stats = train_merges(texts, num_merges, num_threads=num_threads, verbose=verbose)
        if len(merges) < num_merges:
            log.warning("tokenizer: the training text ran out of pairs after %d of %d merges; the vocabulary "
                        "has %d tokens", len(merges), num_merges, 256 + len(merges) + len(SPECIAL_TOKENS))
        tokenizer = cls(merges)
        tokenizer.train_stats = stats
        return tokenizer

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "RustBPETokenizer":
        path = Path(directory) / BPE_FILE
        try:
            meta = json.loads(path.read_text())
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
            if meta["special_tokens"] != SPECIAL_TOKENS:
                raise ValueError("special tokens differ from this version of raychat")
            tokenizer = cls([tuple(m) for m in meta["merges"]], pattern=meta["pattern"])
        except FileNotFoundError:
            raise UserError(f"no tokenizer at {directory}: run `raychat tokenizer train` first") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"tokenizer file {path} is corrupt or from another version ({e}); "
                            "retrain with `raychat tokenizer train`") from None
        if meta.get("fingerprint") != tokenizer.fingerprint():
            raise UserError(f"tokenizer file {path} does not match its fingerprint; retrain with "
                            "`raychat tokenizer train`")
        return tokenizer

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer directory atomically: a complete new directory replaces the old one."""
        import torch
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            meta = {"version": FORMAT_VERSION, "pattern": self.pattern, "special_tokens": SPECIAL_TOKENS,
                    "vocab_size": self.get_vocab_size(), "fingerprint": self.fingerprint(),
                    "merges": self.merges}
            atomic_write(tmp / BPE_FILE, json.dumps(meta, separators=(",", ":")).encode())
            torch.save(self.token_bytes, tmp / TOKEN_BYTES_FILE)
            fsync_file(tmp / TOKEN_BYTES_FILE)
            self.export_hf(tmp / HF_FILE)
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    # ----------------------------------------------------------------------------------- encoding
    def get_vocab_size(self) -> int:
        return len(self._tokens) + len(SPECIAL_TOKENS)

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; expected one of {', '.join(SPECIAL_TOKENS)}") from None

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (or a list of ids per text, encoded on `num_threads` threads). `prepend` / `append`:
        a token id or a special token name added to each result."""
        head = [] if prepend is None else [_resolve_token(self, prepend)]
        tail = [] if append is None else [_resolve_token(self, append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        ids = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if head or tail:
            ids = [head + row + tail for row in ids]
        return ids

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    @cached_property
    def token_bytes(self):
        """torch.int32 [vocab]: UTF-8 bytes of each token, 0 for the special tokens (bits-per-byte)."""
        import torch
        lengths = [len(t) for t in self._tokens] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.int32)

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: the pattern, the ranks and the special tokens."""
        h = hashlib.sha256()
        h.update(self.pattern.encode())
        for token in self._tokens:
            h.update(len(token).to_bytes(4, "little") + token)
        for name in SPECIAL_TOKENS:
            h.update(name.encode() + b"\0")
        return h.hexdigest()

    # --------------------------------------------------------------------------------- conversations
    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation for supervised training; mask 1 = the model is trained to
        produce this token (assistant text, python code and <|assistant_end|>), 0 otherwise."""
        messages = _validate_conversation(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_tokens
        add(sp["<|bos|>"], 0)
        for message in messages:
            if message["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(message["content"]), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add(sp["<|python_start|>"], 1)
                    add(tokens, 1)
                    add(sp["<|python_end|>"], 1)
                else:  # python_output: produced by the tool at inference time, never trained on
                    add(sp["<|output_start|>"], 0)
                    add(tokens, 0)
                    add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for sampling the next assistant message: a trailing assistant message is dropped, the
        conversation must then end with a user message, and <|assistant_start|> is appended."""
        messages = _messages_of(conversation)
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        messages = _validate_conversation(messages)
        if messages[-1]["role"] != "user":
            raise ValueError("a conversation to complete must end with a user message")
        ids, _ = self.render_conversation(messages, max_tokens=2**62)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def visualize_tokenization(self, ids: list[int], mask: list[int]) -> str:
        """Debug view: each token, green when trained on (mask 1), red otherwise."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join(f"{green if m else red}{self.id_to_token(i)}{reset}" for i, m in zip(ids, mask))

    # ------------------------------------------------------------------------------------ HF export
    def export_hf(self, path: str | os.PathLike) -> Path:
        """Write a HF `tokenizers` tokenizer.json that gives exactly our ids (atomic)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from tokenizers import AddedToken

        byte_to_char = _bytes_to_unicode()
        as_str = ["".join(byte_to_char[b] for b in token) for token in self._tokens]
        vocab = {}
        for i, s in enumerate(as_str):
            vocab.setdefault(s, i)
        merges = [(as_str[a], as_str[b]) for a, b in self.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
        for name, token_id in self.special_tokens.items():
            if tok.token_to_id(name) != token_id:
                raise RuntimeError(f"HF export: {name} got id {tok.token_to_id(name)}, expected {token_id}")
        path = Path(path)
        atomic_write(path, tok.to_str().encode())
        return path


# ------------------------------------------------------------------------------------ conversations

_PART_TYPES = ("text", "python", "python_output")


def _messages_of(conversation) -> list[dict]:
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("conversation dict has no 'messages' key")
        conversation = conversation["messages"]
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(f"conversation must be a list of messages or a dict with 'messages', got "
                         f"{type(conversation).__name__}")
    return list(conversation)


def _validate_conversation(conversation) -> list[dict]:
    """Messages with a leading system message merged into the first user message; raises ValueError that
    names the first problem."""
    messages = _messages_of(conversation)
    if not messages:
        raise ValueError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError("message 0 (system): content must be a string")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        first = dict(messages[1])
        if not isinstance(first["content"], str):
            raise ValueError("message 1 (user): content must be a string")
        first["content"] = messages[0]["content"] + "\n\n" + first["content"]
        messages = [first] + messages[2:]
        offset = 1
    else:
        offset = 0
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        index = i + offset
        if m["role"] != expected:
            where = "a system message is only allowed first" if m["role"] == "system" else \
                f"roles must alternate user/assistant starting with user"
            raise ValueError(f"message {index} has role {m['role']!r}, expected {expected!r} ({where})")
        content = m["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {index} (user): content must be a string")
        elif isinstance(content, list):
            if not content:
                raise ValueError(f"message {index} (assistant): content has no parts")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"message {index} (assistant), part {j}: unknown part type {kind!r}; "
                                     f"expected one of {', '.join(_PART_TYPES)}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {index} (assistant), part {j}: 'text' must be a string")
        elif not isinstance(content, str):
            raise ValueError(f"message {index} (assistant): content must be a string or a list of parts")
    return messages


# ---------------------------------------------------------------------------------------- helpers

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what HF ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def get_tokenizer(directory: str | os.PathLike | None = None) -> RustBPETokenizer:
    """The trained tokenizer (default: common.tokenizer_dir())."""
    return RustBPETokenizer.from_directory(directory if directory is not None else tokenizer_dir())
