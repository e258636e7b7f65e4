"""HumanEval (`openai/openai_humaneval`): 164 Python functions to complete, for evaluation only.

The user gives the function's signature and docstring; the reference reply is the whole function. A
completion is graded by running the task's unit tests against it: `program()` builds that test program,
and `evaluate()` hands it to the `execute` callable it is given (chat evaluation's sandbox: generated
code must never run in the trainer's own process). The offline copy is OpenAI's own file, same fields.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from raychat.tasks.common import Task, load_rows, read_jsonl_gz

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    match = CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


class HumanEval(Task):
    def __init__(self, limit: int = -1, download: bool = True):
        super().__init__(limit)
        self.name = "humaneval"
        self.rows = load_rows("openai_humaneval-test", ("openai/openai_humaneval", None, "test"),
                              lambda root: read_jsonl_gz(Path(root) / "humaneval" / "HumanEval.jsonl.gz"), download)

    def num_rows(self) -> int:
        return len(self.rows)

    def conversation(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                "entry_point": row["entry_point"]}

    def program(self, conversation: dict, completion: str) -> str:
        """The completion's code (the prompt in front when it only wrote the body), then the tests."""
        code = extract_code(completion)
        if f"def {conversation['entry_point']}" not in code:
            code = conversation["prompt"] + code
        return f"{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation: dict, completion: str, execute: Callable[[str], bool] | None = None) -> bool:
        if execute is None:
            raise ValueError("HumanEval runs generated code: pass the sandbox that executes it (execute=...)")
        return bool(execute(self.program(conversation, completion)))
