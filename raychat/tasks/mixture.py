"""Task mixtures: several tasks as one list of conversations, in one deterministic shuffled order.

A mixture is written the way the config holds it: comma-separated items `name[:N][*K]`, for example
`smoltalk,mmlu-aux:5000,gsm8k,identity*2,spelling:200000`. `name` is a task of `TASKS`; `:N` keeps a
dataset's first N conversations, or sets how many a generated task (identity, spelling) makes; `*K`
oversamples: every conversation of that task appears K times. The whole list is then shuffled once with
`random.Random(seed)`, so the same string and seed always give the same order.
"""
from __future__ import annotations

import bisect
import random
import re

import numpy as np

from raychat.common import UserError

GENERATED_DEFAULT_SIZE = 1000   # identity / spelling tasks without an explicit :N


def _task_factories() -> dict:
    from raychat.tasks.arc import ARC
    from raychat.tasks.gsm8k import GSM8K
    from raychat.tasks.humaneval import HumanEval
    from raychat.tasks.identity import Identity
    from raychat.tasks.mmlu import MMLU
    from raychat.tasks.smoltalk import SmolTalk
    from raychat.tasks.spelling import CountLetter, SpellWord

    def size(n):
        return GENERATED_DEFAULT_SIZE if n < 0 else n

    # name -> (n, download, seed) -> Task
    return {
        "smoltalk": lambda n, d, s: SmolTalk("train", n, d),
        "smoltalk-test": lambda n, d, s: SmolTalk("test", n, d),
        "mmlu-aux": lambda n, d, s: MMLU("auxiliary_train", "train", n, d),
        "mmlu": lambda n, d, s: MMLU("all", "test", n, d),
        "gsm8k": lambda n, d, s: GSM8K("train", n, d),
        "gsm8k-test": lambda n, d, s: GSM8K("test", n, d),
        "arc-easy": lambda n, d, s: ARC("ARC-Easy", "train", n, d),
        "arc-easy-test": lambda n, d, s: ARC("ARC-Easy", "test", n, d),
        "arc-challenge": lambda n, d, s: ARC("ARC-Challenge", "train", n, d),
        "arc-challenge-test": lambda n, d, s: ARC("ARC-Challenge", "test", n, d),
        "humaneval": lambda n, d, s: HumanEval(n, d),
        "identity": lambda n, d, s: Identity(size(n), s),
        "spelling": lambda n, d, s: SpellWord(size(n), "train", s, d),
        "spelling-test": lambda n, d, s: SpellWord(size(n), "test", s, d),
        "spelling-bee": lambda n, d, s: CountLetter(size(n), "train", s, d),
        "spelling-bee-test": lambda n, d, s: CountLetter(size(n), "test", s, d),
    }


TASKS = ("smoltalk", "smoltalk-test", "mmlu-aux", "mmlu", "gsm8k", "gsm8k-test", "arc-easy", "arc-easy-test",
         "arc-challenge", "arc-challenge-test", "humaneval", "identity", "spelling", "spelling-test",
         "spelling-bee", "spelling-bee-test")
ITEM = re.compile(r"([a-z0-9-]+)(?::(\d+))?(?:\*(\d+))?")


def parse_mixture(spec: str, field: str = "mixture") -> list[tuple[str, int, int]]:
    """`name[:N][*K],...` -> [(name, N or -1, K)]; a one-line UserError naming `field` otherwise."""
    items = []
    for text in spec.split(","):
        match = ITEM.fullmatch(text.strip())
        if not match:
            raise UserError(f"{field}: cannot read '{text.strip()}' in '{spec}': write name[:N][*K], e.g. "
                            f"gsm8k:1000*2")
        name, n, times = match.group(1), int(match.group(2) or -1), int(match.group(3) or 1)
        if name not in TASKS:
            raise UserError(f"{field}: unknown task '{name}': choose from {', '.join(TASKS)}")
        if times < 1 or n == 0:
            raise UserError(f"{field}: '{text.strip()}' selects no conversation (N and K must be >= 1)")
        items.append((name, n, times))
    return items


class TaskMixture:
    """Tasks with per-task oversampling, shuffled once: `len(mixture)`, `mixture[i]` -> a conversation."""

    def __init__(self, parts: list[tuple[object, int]], seed: int = 42):
        if not parts:
            raise UserError("a task mixture needs at least one task")
        self.tasks = [task for task, _ in parts]
        self.times = [times for _, times in parts]
        self.offsets = np.cumsum([0] + [len(task) for task in self.tasks]).tolist()
        order = [g for t, times in enumerate(self.times) for _ in range(times)
                 for g in range(self.offsets[t], self.offsets[t + 1])]
        random.Random(seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, index: int) -> tuple[int, int]:
        """(task number, row in that task) of mixture position `index`."""
        g = int(self.order[index])
        t = bisect.bisect_right(self.offsets, g) - 1
        return t, g - self.offsets[t]

    def __getitem__(self, index: int) -> dict:
        t, row = self.locate(index)
        return self.tasks[t][row]

    def describe(self) -> dict:
        """{task name: conversations in the mixture} (oversampling included)."""
        counts: dict[str, int] = {}
        for task, times in zip(self.tasks, self.times):
            counts[task.name] = counts.get(task.name, 0) + len(task) * times
        return counts


def build_mixture(spec: str, seed: int = 42, download: bool = True, field: str = "mixture") -> TaskMixture:
    """The mixture a config string describes (see the module docstring)."""
    factories = _task_factories()
    return TaskMixture([(factories[name](n, download, seed), times)
                        for name, n, times in parse_mixture(spec, field)], seed)
