"""MMLU (`cais/mmlu`): multiple choice over 57 subjects. `auxiliary_train` (about 100k questions drawn
from ARC, OpenBookQA, MCTest and RACE) is mid-training data; the `all` subset's `test` split is for
chat evaluation.

Offline stand-ins (neither split could be copied): `auxiliary_train` is OpenBookQA train + ARC-Easy and
ARC-Challenge train, two of the very sources the real split is built from; `test` is MMLU's own
`validation` split (same subjects and format, 1,531 questions). The hub's `auxiliary_train` rows nest
their fields under a `train` key; both shapes are read.
"""
from __future__ import annotations

from pathlib import Path

from raychat.tasks.arc import OFFLINE_SPLIT
from raychat.tasks.common import MultipleChoiceTask, load_rows, read_jsonl_gz

SUBSETS = {"auxiliary_train": ("train",), "all": ("test", "validation")}


def _mmlu_row(ai2_row: dict, subject: str) -> dict:
    """An AI2-format (ARC, OpenBookQA) row in MMLU's schema."""
    choices = ai2_row["question"]["choices"]
    labels = [c["label"] for c in choices]
    return {"question": ai2_row["question"]["stem"], "subject": subject,
            "choices": [c["text"] for c in choices], "answer": labels.index(ai2_row["answerKey"])}


def offline_rows(root: Path, subset: str) -> list[dict]:
    if subset == "all":   # test and validation: MMLU's validation split, already in the hub schema
        return read_jsonl_gz(root / "mmlu" / "validation.jsonl.gz")
    rows = [_mmlu_row(r, "openbookqa") for r in read_jsonl_gz(root / "openbookqa" / "train.jsonl.gz")]
    for arc in ("ARC-Easy", "ARC-Challenge"):
        path = root / "arc" / f"{arc}-{OFFLINE_SPLIT['train']}.jsonl.gz"
        rows += [_mmlu_row(r, arc.lower().replace("-", "_")) for r in read_jsonl_gz(path)]
    return rows


class MMLU(MultipleChoiceTask):
    def __init__(self, subset: str, split: str, limit: int = -1, download: bool = True):
        if split not in SUBSETS.get(subset, ()):
            raise ValueError(f"MMLU: (subset, split) must be one of "
                             f"{[(s, p) for s, splits in SUBSETS.items() for p in splits]}, got {(subset, split)}")
        self.name = f"mmlu-{subset}-{split}"
        rows = load_rows(f"mmlu-{subset}-{split}", ("cais/mmlu", subset, split),
                         lambda root: offline_rows(root, subset), download)
        super().__init__(rows, limit)

    def question(self, row: dict) -> tuple[str, list[str], int]:
        row = row.get("train", row) if isinstance(row.get("train"), dict) else row
        return row["question"], list(row["choices"]), int(row["answer"])
