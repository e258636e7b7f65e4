"""Spelling tasks generated from an English word list: small models see tokens, not letters, so they are
taught explicitly how words are spelled.

- `SpellWord` ("spelling"): spell a word letter by letter ("apple" -> "a-p-p-l-e").
- `CountLetter` ("spelling-bee"): count a letter in a word: spell the word, point at the matches, then
  check with a calculator call (`'apple'.count('p')`), and end with `#### 2` as GSM8K answers do.

Conversation i of a task is drawn from a random generator seeded with (seed, split, i): any number of
conversations, the same ones every time, and different ones for the train and test splits. The words
are dwyl's `words_alpha.txt` (370k lowercase words): offline from RAYCHAT_DATA_DIR/words, otherwise
downloaded once by `datasets` (its "text" loader) into RAYCHAT_BASE_DIR/chat_data.
"""
from __future__ import annotations

import gzip
import random
import string
from functools import lru_cache
from pathlib import Path

from raychat.common import UserError, atomic_write, get_data_dir
from raychat.tasks.common import Task, chat_data_dir
from raychat.tasks.gsm8k import extract_answer

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"

SPELL_PROMPTS = [
    "Spell the word '{word}'.",
    'How do you spell "{word}"?',
    "Can you spell {word} letter by letter?",
    "spell {word}",
    "What letters make up the word {word}?",
    "Please spell out '{word}' for me.",
    "Write {word} one letter at a time.",
]
COUNT_PROMPTS = [
    "How many times does the letter '{letter}' appear in '{word}'?",
    "How many {letter}'s are in the word {word}?",
    'Count the letter {letter} in "{word}".',
    "In the word {word}, how many times do you see the letter {letter}?",
    "how many {letter} in {word}",
    "What is the number of '{letter}' letters in '{word}'?",
]


def fetch_words(source: str, path: Path) -> Path:
    """The word list from `source` (a URL, or a local .txt / .txt.gz), one word a line, written to `path`
    atomically. `datasets` does the downloading (retries, caching)."""
    import datasets
    try:
        lines = datasets.load_dataset("text", data_files=source, split="train")["text"]
    except Exception as error:
        raise UserError(f"could not load the word list from {source}: {str(error).splitlines()[0]}; offline, "
                        f"set RAYCHAT_DATA_DIR to local copies of the datasets") from None
    words = [w.strip() for w in lines if w.strip()]
    atomic_write(path, "\n".join(words) + "\n")
    return path


@lru_cache(maxsize=2)
def _read_words(path: str) -> tuple[str, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            words = tuple(w.strip() for w in f if w.strip())
    except OSError as error:
        raise UserError(f"cannot read the word list {path} ({error})") from None
    if not words:
        raise UserError(f"the word list {path} is empty")
    return words


def load_words(download: bool = True) -> tuple[str, ...]:
    root = get_data_dir()
    if root is not None:
        return _read_words(str(root / "words" / "words_alpha.txt.gz"))
    path = chat_data_dir() / "words_alpha.txt"
    if not path.exists():
        if not download:
            raise UserError(f"{path} is missing: the training driver fetches it before the workers start")
        fetch_words(WORDS_URL, path)
    return _read_words(str(path))


class _GeneratedTask(Task):
    def __init__(self, size: int, split: str = "train", seed: int = 42, download: bool = True):
        super().__init__()
        if split not in ("train", "test"):
            raise ValueError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        self.size, self.split, self.seed = size, split, seed
        self.words = load_words(download)

    def num_rows(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.name}/{self.seed}/{self.split}/{index}")   # str seeds are stable


class SpellWord(_GeneratedTask):
    name = "spelling"

    def conversation(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        prompt = rng.choice(SPELL_PROMPTS).format(word=word)
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": "-".join(word)}], "word": word}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return "-".join(conversation["word"]) in completion.lower()


class CountLetter(_GeneratedTask):
    name = "spelling-bee"

    def conversation(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that 0 is an answer too
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
        shown = letter.upper() if rng.random() < 0.2 else letter
        prompt = rng.choice(COUNT_PROMPTS).format(letter=shown, word=word)
        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        count = len(positions)
        if count == 0:
            found = f"The letter '{letter}' is not in it, so I count 0."
        elif count == 1:
            found = f"The letter '{letter}' is at position {positions[0]}, so I count 1."
        else:
            found = (f"The letter '{letter}' is at positions {', '.join(positions[:-1])} and {positions[-1]}, "
                     f"so I count {count}.")
        parts = [
            {"type": "text",
             "text": f"Spelling out '{word}': {'-'.join(word)}.\n{found}\n\nChecking with the calculator: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} time{'' if count == 1 else 's'} "
                                     f"in '{word}'.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": str(count)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return extract_answer(completion) == conversation["answer"]
