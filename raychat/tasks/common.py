"""What every task shares: the `Task` interface, multiple-choice rendering, and where rows come from.

A task is a list-like dataset of conversations in the tokenizer's conversation format (tokenizer.py):
`len(task)`, `task[i]` -> `{"messages": [...], ...}`, the same rows in the same order every time. A task
with a right answer also grades a completion (the text of the assistant's reply): `evaluate(conversation,
completion)` -> bool and `reward(conversation, completion)` -> float, for chat evaluation and RL.

Rows are always handed to a task in the Hugging Face schema of its dataset, from one of three places:

- `RAYCHAT_DATA_DIR` set: the offline copies. Some are stand-ins with their own formats (README: which
  stands for what); each task module turns them into the hub schema.
- otherwise `RAYCHAT_BASE_DIR/chat_data/{name}.parquet`: the rows the driver fetched. Training workers read
  only this file (on a cluster RAYCHAT_BASE_DIR is the shared filesystem), so they download nothing.
- otherwise, when `download` is true (the driver's preflight), the Hugging Face hub through `datasets`;
  the rows are then written to the file above, atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

from raychat.common import UserError, atomic_write, get_base_dir, get_data_dir, get_logger

LETTERS = "ABCDEFGHIJ"

log = get_logger("raychat.tasks")


class Task:
    """A list-like dataset of conversations; `limit` keeps the first rows only (-1 = all)."""
    name = ""
    eval_type = "generative"     # "categorical": the answer is one of a few letters (multiple choice)

    def __init__(self, limit: int = -1):
        self.limit = limit

    def num_rows(self) -> int:
        raise NotImplementedError

    def conversation(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_rows()
        return n if self.limit < 0 else min(n, self.limit)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} outside 0..{len(self) - 1}")
        return self.conversation(index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{self.name} has no right answer to grade")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))


# ------------------------------------------------------------------------------------ multiple choice

def multiple_choice(question: str, choices: list[str], answer: int) -> dict:
    """The question with lettered choices; the assistant answers with the single letter."""
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
        raise ValueError(f"a multiple-choice question needs 2-{len(LETTERS)} choices and an answer among them, "
                         f"got {len(choices)} choices and answer {answer}")
    letters = LETTERS[:len(choices)]
    lines = [question.strip(), ""] + [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return {"messages": [{"role": "user", "content": "\n".join(lines)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": list(letters), "answer": letters[answer]}


class MultipleChoiceTask(Task):
    """Rows in a hub schema -> (question, choices, answer index) -> a lettered question."""
    eval_type = "categorical"

    def __init__(self, rows: Sequence[dict], limit: int = -1):
        super().__init__(limit)
        self.rows = rows

    def num_rows(self) -> int:
        return len(self.rows)

    def question(self, row: dict) -> tuple[str, list[str], int]:
        raise NotImplementedError

    def conversation(self, index: int) -> dict:
        return multiple_choice(*self.question(self.rows[index]))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip().rstrip(".").strip().upper() == conversation["answer"]


# --------------------------------------------------------------------------------------- where rows are

def chat_data_dir() -> Path:
    """Where the driver keeps the rows it fetched from the hub (RAYCHAT_BASE_DIR/chat_data)."""
    return get_base_dir() / "chat_data"


class ParquetRows:
    """The rows of a parquet file as dicts, read on demand from a memory-mapped table: a 460k-conversation
    dataset is not held as Python objects in every worker."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            self.table = pq.read_table(path, memory_map=True)
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path} is not a readable parquet file ({error}): delete it to fetch it again") from None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]


def load_rows(name: str, hub: tuple[str, str | None, str], offline: Callable[[Path], list[dict]],
              download: bool = True) -> Sequence[dict]:
    """The rows of one dataset split in its hub schema (see the module docstring for the three sources).

    name: file name under chat_data/ (e.g. "gsm8k-main-train"); hub: (repo, config, split) for
    `datasets.load_dataset`; offline: reads them from RAYCHAT_DATA_DIR (the path it is given)."""
    root = get_data_dir()
    if root is not None:
        return offline(root)
    path = chat_data_dir() / f"{name}.parquet"
    if not path.exists():
        if not download:
            raise UserError(f"{path} is missing: the training driver fetches the chat datasets before the "
                            f"workers start (or set RAYCHAT_DATA_DIR to the offline copies)")
        fetch_hub_split(*hub, path)
    return ParquetRows(path)


def fetch_hub_split(repo: str, config: str | None, split: str, path: Path) -> Path:
    """One split from the Hugging Face hub (`datasets` downloads and caches it), written as parquet to
    `path` in one atomic rename."""
    import datasets
    log.info(f"loading {repo} ({config or 'default'}, {split}) from the Hugging Face hub")
    try:
        dataset = datasets.load_dataset(repo, config, split=split)
    except Exception as error:   # network, authentication, a renamed dataset: one line, and the way out
        raise UserError(f"could not load {repo} ({config or 'default'}, {split}) from the Hugging Face hub: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; offline, set "
                        f"RAYCHAT_DATA_DIR to local copies of the datasets") from None
    buffer = io.BytesIO()
    dataset.to_parquet(buffer)
    atomic_write(path, buffer.getvalue())
    return path


def read_jsonl_gz(path: Path) -> list[dict]:
    """Rows of a gzipped JSON-lines file (the offline copies), or a UserError naming the file."""
    import gzip
    import json
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path} is missing from RAYCHAT_DATA_DIR") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not gzipped JSON lines ({error})") from None
