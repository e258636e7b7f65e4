"""SmolTalk (`HuggingFaceTB/smol-smoltalk`): general multi-turn chat, the bulk of mid-training and a
part of SFT. Rows are `{"messages": [{"role", "content"}, ...]}`, sometimes with a system message first
(the tokenizer folds it into the first user message).

Offline stand-in: 95 human-written OpenAssistant (OASST1) conversations in the same `messages` shape;
the last 10 play the `test` split and the first 85 the `train` split.
"""
from __future__ import annotations

from pathlib import Path

from raychat.tasks.common import Task, load_rows, read_jsonl_gz

OFFLINE_TEST_ROWS = 10


def offline_rows(root: Path, split: str) -> list[dict]:
    rows = read_jsonl_gz(root / "chat" / "oasst_en_100_conversations.jsonl.gz")
    rows = rows[-OFFLINE_TEST_ROWS:] if split == "test" else rows[:-OFFLINE_TEST_ROWS]
    return [{"messages": row["messages"]} for row in rows]


class SmolTalk(Task):
    def __init__(self, split: str, limit: int = -1, download: bool = True):
        super().__init__(limit)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk: split must be 'train' or 'test', got {split!r}")
        self.name = f"smoltalk-{split}"
        self.rows = load_rows(f"smol-smoltalk-{split}", ("HuggingFaceTB/smol-smoltalk", None, split),
                              lambda root: offline_rows(root, split), download)

    def num_rows(self) -> int:
        return len(self.rows)

    def conversation(self, index: int) -> dict:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]}
