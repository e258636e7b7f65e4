"""ARC-Easy and ARC-Challenge (`allenai/ai2_arc`): grade-school science questions, multiple choice.

SFT trains on both train splits; chat evaluation uses the test splits. The offline copies are AI2's
own release (`{subset}-{Train,Dev,Test}.jsonl.gz`, the question under `question.stem` and the choices as
a list of {text, label}); they are turned into the hub's schema (`question`, `choices: {text, label}`,
`answerKey`). Some questions have 3 or 5 choices, some use labels "1".."4": the choices are always shown
with the letters A, B, C, ...
"""
from __future__ import annotations

from pathlib import Path

from raychat.tasks.common import MultipleChoiceTask, load_rows, read_jsonl_gz

SUBSETS = ("ARC-Easy", "ARC-Challenge")
OFFLINE_SPLIT = {"train": "Train", "validation": "Dev", "test": "Test"}


def from_ai2(row: dict) -> dict:
    """An AI2-format row in the hub's schema."""
    choices = row["question"]["choices"]
    return {"id": row["id"], "question": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"]}


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str, split: str, limit: int = -1, download: bool = True):
        if subset not in SUBSETS or split not in OFFLINE_SPLIT:
            raise ValueError(f"ARC: subset must be one of {SUBSETS} and split one of {tuple(OFFLINE_SPLIT)}, "
                             f"got {subset!r}, {split!r}")
        self.name = f"{subset}-{split}"

        def offline(root: Path) -> list[dict]:
            return [from_ai2(r) for r in read_jsonl_gz(root / "arc" / f"{subset}-{OFFLINE_SPLIT[split]}.jsonl.gz")]

        rows = load_rows(f"ai2_arc-{subset}-{split}", ("allenai/ai2_arc", subset, split), offline, download)
        super().__init__(rows, limit)

    def question(self, row: dict) -> tuple[str, list[str], int]:
        labels = list(row["choices"]["label"])
        return row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"])
