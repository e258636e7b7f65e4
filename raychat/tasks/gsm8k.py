"""GSM8K (`openai/gsm8k`, `main`): grade-school math word problems, solved with calculator calls.

Each reference solution marks its arithmetic as `<<48/2=24>>`. The assistant's message becomes a list of
parts: the text, then for every annotation a `python` part with the expression (the model learns to
write it, and the engine runs it on the calculator) and a `python_output` part with the result (forced
by the engine at inference, never trained on). The output is what the calculator itself prints for the
expression ("144" where the annotation wrote "144.00"), so training shows the model exactly what the tool
will answer; only when the calculator refuses an expression (two `//` divisions in the train split) is
the annotation's own result kept. The final line, `#### 72`, is the answer that is graded.
"""
from __future__ import annotations

import re
from pathlib import Path

from raychat.calculator import calculate
from raychat.tasks.common import Task, load_rows, read_jsonl_gz

ANNOTATION = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def solution_parts(answer: str) -> list[dict]:
    """The reference solution as assistant parts: text, python (expression), python_output (result)."""
    parts: list[dict] = []
    position = 0
    for match in ANNOTATION.finditer(answer):
        if match.start() > position:
            parts.append({"type": "text", "text": answer[position:match.start()]})
        expression, _, result = match.group(1).rpartition("=")
        computed = calculate(expression)
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": computed if computed is not None else result})
        position = match.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, without thousands separators; None when there is none."""
    found = FINAL_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


class GSM8K(Task):
    def __init__(self, split: str, limit: int = -1, download: bool = True):
        super().__init__(limit)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K: split must be 'train' or 'test', got {split!r}")
        self.name = f"gsm8k-{split}"
        self.rows = load_rows(f"gsm8k-main-{split}", ("openai/gsm8k", "main", split),
                              lambda root: read_jsonl_gz(Path(root) / "gsm8k" / f"{split}.jsonl.gz"), download)

    def num_rows(self) -> int:
        return len(self.rows)

    def conversation(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}],
                "answer": extract_answer(row["answer"])}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and _same_number(predicted, conversation["answer"])


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b
