"""Rewards for RL: a completion (the text of the assistant's reply) against a task's reference answer.

Every reward here reads only the reply's final answer, written as `#### N` the way GSM8K's reference
solutions end, so the model is rewarded for the answer it commits to, not for a number it happens to
mention. What is not rewarded (each a way a policy could learn to collect reward without solving):

- no `####` at all, or nothing after it (an empty answer), even when the right number is in the text
  (for instance in the restated question);
- several `####` answers that disagree (hedging: "#### 3 ... #### 4");
- the number buried in a longer string ("#### 172" for 72, "#### 72abc", "#### 7.2.1"): the number must
  stand alone.

Numbers compare exactly after commas are stripped: "1,000" = "1000" and "2.50" = "2.5" (decimals, not
floats). A task is given its reward function in `raychat/rl/tasks.py`; spelling-bee counts use the
same `####` rule.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# `####`, then a number standing alone: not preceded by anything after the spaces, and followed by the end,
# whitespace or sentence punctuation (never by a letter, a digit or another `.digit`)
ANSWER = re.compile(r"####[ \t]*(\S*)")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_answers(text: str) -> list[Decimal | None]:
    """The value of every `#### ...` in `text`, in order; None for one that is not a lone number."""
    values = []
    for match in ANSWER.finditer(text):
        token = match.group(1).rstrip(".,;:!?)")
        values.append(_number(token) if NUMBER.fullmatch(token) else None)
    return values


def _number(token: str) -> Decimal | None:
    try:
        return Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None


def committed_answer(text: str) -> Decimal | None:
    """The reply's final answer: every `####` in it must carry the same lone number; None otherwise."""
    values = final_answers(text)
    if not values or any(v is None for v in values) or len(set(values)) > 1:
        return None
    return values[0]


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 when the completion commits to the number after the last `####` of `answer` (the dataset's
    answer text), else 0.0."""
    reference = final_answers(answer)
    if not reference or reference[-1] is None:
        raise ValueError(f"the reference answer has no final '#### N': {answer[-80:]!r}")
    got = committed_answer(completion)
    return 1.0 if got is not None and got == reference[-1] else 0.0


def count_reward(completion: str, count: str) -> float:
    """Spelling bee: 1.0 when the completion commits (`#### N`) to the letter count `count`."""
    got = committed_answer(completion)
    return 1.0 if got is not None and got == Decimal(count) else 0.0
