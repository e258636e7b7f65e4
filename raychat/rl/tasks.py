"""The tasks RL can train on, each a question set with a reward (`rl.task`).

- `gsm8k`: GSM8K train questions; reward `gsm8k_reward` (the reply's `#### N` equals the reference).
- `spelling-bee`: generated letter-counting questions; reward `count_reward` (same `####` rule). It is
  here to show that rewards are pluggable: a task is a question list plus a function of the reply.
- `fixed:<answer>`: one fixed question ("Say the word <answer>."), reward 1 when the reply starts with
  <answer>. A task even a tiny random model can learn in a few steps: the RL smoke test.

Each task gives `len()`, `question(i)` -> a conversation to complete, and `reward(conversation, reply)`.
"""
from __future__ import annotations

from raychat.common import UserError
from raychat.rl.rewards import count_reward, gsm8k_reward

SPELLING_BEE_QUESTIONS = 100_000


class RLTask:
    def __init__(self, task, reward_fn):
        self.task, self.reward_fn = task, reward_fn

    def __len__(self) -> int:
        return len(self.task)

    def question(self, index: int) -> dict:
        return self.task[index]

    def reward(self, conversation: dict, reply: str) -> float:
        return self.reward_fn(conversation, reply)


class FixedQuestion:
    """A one-row task: the question asks for `answer`."""

    def __init__(self, answer: str):
        self.answer = answer

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say the word {self.answer}."}], "answer": self.answer}


def build_rl_task(spec: str, split: str = "train", download: bool = True) -> RLTask:
    """The task named by `rl.task` (see the module docstring)."""
    if spec == "gsm8k":
        from raychat.tasks.gsm8k import GSM8K
        return RLTask(GSM8K(split, download=download), lambda c, reply: gsm8k_reward(reply, f"#### {c['answer']}"))
    if spec == "spelling-bee":
        from raychat.tasks.spelling import CountLetter
        return RLTask(CountLetter(SPELLING_BEE_QUESTIONS, split=split, download=download),
                      lambda c, reply: count_reward(reply, c["answer"]))
    if spec.startswith("fixed:") and spec[len("fixed:"):].strip():
        answer = spec[len("fixed:"):].strip()
        return RLTask(FixedQuestion(answer), lambda c, reply: float(reply.lstrip().startswith(c["answer"])))
    raise UserError(f"rl.task must be gsm8k, spelling-bee or fixed:<word>, got {spec!r}")
