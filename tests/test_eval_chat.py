"""Chat evaluation (raychat.eval.chat) and the model pool it runs on (raychat.pool).

The scoring is checked against hand computations (pass@k, centered accuracy, a model scripted to prefer
one letter); the pool against itself: the same problems give the same answers, word for word, on 1 actor,
on 2, and on 2 of which one is killed in the middle of the work.
"""
import json
import threading
import time
from types import SimpleNamespace

import pytest
import ray
import torch

from raychat.common import UserError
from raychat.config import load_config
from raychat.eval.chat import (ChatEvalWorker, choose_letters, evaluate_chat, main, parse_tasks, pass_at_k,
                               render_problems, build_task, summarize_task)
from raychat.pool import ModelPool
from serve_helpers import save_checkpoint, tiny_model


class PrefersLetters(torch.nn.Module):
    """A model whose next-token logits are the same after any prompt: `scores` (token id -> logit), every
    other token 0. Not a GPT, but what `choose_letters` asks of one: hidden_states and lm_head."""

    def __init__(self, vocab_size: int, scores: dict[int, float]):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for token, score in scores.items():
                self.lm_head.weight[token, 0] = score

    def hidden_states(self, idx, kv_cache=None):
        return torch.ones(idx.shape[0], idx.shape[1], 1)


def letter_id(tokenizer, letter):
    [token] = tokenizer.encode(letter)
    return token


def test_pass_at_k_matches_a_hand_computation():
    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@3 = 1 - 1/4; pass@4 = 1
    assert [pass_at_k(4, 1, k) for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [pass_at_k(5, 2, k) for k in (1, 2)] == pytest.approx([0.4, 1 - 3 / 10])
    assert pass_at_k(3, 0, 3) == 0.0 and pass_at_k(3, 3, 1) == 1.0


def test_a_generative_task_summary_is_pass_at_k_averaged_over_problems():
    problems = [{"index": i, "conversation": {}} for i in range(3)]
    graded = [{"correct": [True, False], "replies": ["a", "b"]}, {"correct": [False, False], "replies": ["c", "d"]},
              {"correct": [True, True], "replies": ["e", "f"]}]
    r = summarize_task("GSM8K", "generative", problems, graded, num_samples=2, skipped=0)
    # pass@1: (1/2 + 0 + 1) / 3; pass@2: (1 + 0 + 1) / 3; generative baseline 0, so centered = accuracy
    assert r["pass_at_k"] == pytest.approx({"1": 0.5, "2": 2 / 3})
    assert r["accuracy"] == r["centered"] == pytest.approx(0.5) and r["baseline"] == 0.0
    assert r["examples"][0] == {"index": 0, "replies": ["a", "b"], "correct": [True, False]}


def test_the_multiple_choice_baseline_is_one_over_the_number_of_choices():
    problems = [{"index": 0, "conversation": {"letters": list("ABCD")}},
                {"index": 1, "conversation": {"letters": list("ABC")}},
                {"index": 2, "conversation": {"letters": list("ABCDE")}}]
    graded = [{"correct": [c], "replies": ["A"]} for c in (True, True, False)]
    r = summarize_task("ARC-Easy", "categorical", problems, graded, num_samples=4, skipped=0)
    baseline = (1 / 4 + 1 / 3 + 1 / 5) / 3
    assert r["baseline"] == pytest.approx(baseline) and r["num_samples"] == 1
    assert r["centered"] == pytest.approx((2 / 3 - baseline) / (1 - baseline))


def test_a_model_that_prefers_one_letter_scores_the_share_of_questions_it_answers(tokenizer):
    task = build_task("ARC-Easy")
    problems, skipped = render_problems(task, tokenizer, max_problems=60, max_prompt_tokens=10**6)
    assert len(problems) == 60 and skipped == 0
    answers = [p["conversation"]["answer"] for p in problems]
    a, b, e = (letter_id(tokenizer, x) for x in "ABE")
    always_b = PrefersLetters(tokenizer.get_vocab_size(), {b: 5.0})
    chosen = choose_letters(always_b, tokenizer, problems, "cpu")
    assert chosen == ["B"] * 60
    assert sum(x == "B" for x in answers) / 60 == pytest.approx(
        sum(c == x for c, x in zip(chosen, answers)) / 60)
    # only the question's own letters compete: "E" (not a choice of a 4-way question) is never the answer,
    # and a higher logit for any non-letter token changes nothing
    e_then_a = PrefersLetters(tokenizer.get_vocab_size(), {e: 9.0, a: 3.0, letter_id(tokenizer, "x"): 20.0})
    chosen = choose_letters(e_then_a, tokenizer, problems, "cpu")
    assert chosen == ["E" if "E" in p["conversation"]["letters"] else "A" for p in problems]


def test_a_padded_batch_gives_each_prompt_the_logits_it_has_alone(tokenizer):
    """choose_letters pads prompts of different lengths into one batch: the letter logits of a prompt
    must not depend on its neighbours (a real GPT, causal attention)."""
    model = tiny_model(tokenizer, sequence_len=512)
    problems, _ = render_problems(build_task("ARC-Challenge"), tokenizer, max_problems=12, max_prompt_tokens=511)
    assert len({len(p["prompt"]) for p in problems}) > 1
    together = choose_letters(model, tokenizer, problems, "cpu")
    alone = [choose_letters(model, tokenizer, [p], "cpu")[0] for p in problems]
    assert together == alone


def test_task_names_and_sampling_options_are_checked(tokenizer, tmp_path, monkeypatch):
    assert parse_tasks("GSM8K, ARC-Easy,GSM8K") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(UserError, match="unknown chat task.*gsm8k.*choose from"):
        parse_tasks("gsm8k")
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))
    cfg = load_config("demo", [])
    args = SimpleNamespace(source="sft", step=None, tasks="GSM8K", max_problems=2, num_samples=4)
    with pytest.raises(UserError, match="eval.temperature=0 samples the same reply"):
        main(cfg, args)
    with pytest.raises(UserError, match="--max-problems must be -1"):
        main(cfg, SimpleNamespace(**{**vars(args), "num_samples": 1, "max_problems": 0}))


SAMPLING = {"max_tokens": 12, "temperature": 1.0, "top_k": 50, "seed": 7}
TASKS = ["ARC-Easy", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    return tiny_model(tokenizer, sequence_len=512, seed=3)


def run_eval(pool, tokenizer):
    return evaluate_chat(pool, tokenizer, TASKS, max_problems=5, num_samples=2, sampling=SAMPLING,
                         batch_size=4, max_prompt_tokens=511)


def test_the_pool_gives_the_same_answers_with_one_or_two_actors_and_when_an_actor_dies(ray_cluster, tokenizer,
                                                                                      chat_model):
    with ModelPool(ChatEvalWorker, chat_model, tokenizer, 1, False) as pool:
        one = run_eval(pool, tokenizer)
    with ModelPool(ChatEvalWorker, chat_model, tokenizer, 2, False) as pool:
        two = run_eval(pool, tokenizer)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert set(one["tasks"]) == set(TASKS) and one["partial"] == ["ARC-Challenge"]
    for name in ("GSM8K", "SpellingBee"):
        replies = [reply for example in one["tasks"][name]["examples"] for reply in example["replies"]]
        assert len(replies) == 6 and any(replies)  # sampled text, two per problem, not empty every time
    assert all(len(e["replies"]) == 2 for e in one["tasks"]["GSM8K"]["examples"])

    with ModelPool(ChatEvalWorker, chat_model, tokenizer, 2, False) as pool:
        victim = pool.actors[0]
        killer = threading.Timer(1.0, lambda: ray.kill(victim))
        killer.start()
        started = time.monotonic()
        survived = run_eval(pool, tokenizer)
        killer.join()
        assert time.monotonic() - started > 1.0, "the work ended before the actor was killed: nothing was tested"
        assert pool.restarts == 1 and pool.actors[0] is not victim
    assert json.dumps(survived, sort_keys=True) == json.dumps(one, sort_keys=True)


def test_raychat_eval_chat_writes_the_table_csv_and_json(ray_cluster, tokenizer, tmp_path, monkeypatch, capsys):
    base = save_checkpoint(tokenizer, tmp_path / "base")
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(base))
    cfg = load_config("demo", ["eval.max_new_tokens=8", "eval.temperature=1.0"])
    args = SimpleNamespace(source="sft", step=None, tasks="ARC-Easy,SpellingBee", max_problems=3, num_samples=2)
    assert main(cfg, args) == 0
    printed = capsys.readouterr().out
    assert "ARC-Easy" in printed and "SpellingBee" in printed and "ChatCORE" in printed
    saved = json.loads((base / "report" / "chat_eval_sft.json").read_text())
    assert saved["source"] == "sft" and set(saved["tasks"]) == {"ARC-Easy", "SpellingBee"}
    assert saved["chatcore"] == pytest.approx(sum(t["centered"] for t in saved["tasks"].values()) / 2)
    rows = (base / "report" / "chat_eval_sft.csv").read_text().splitlines()
    assert rows[0].startswith("task,eval_type,num_problems,num_samples,accuracy,baseline,centered,pass@1,pass@2")
    assert [row.split(",")[0] for row in rows[1:]] == ["ARC-Easy", "SpellingBee"]
    assert not list((base / "report").glob(".*"))  # no temp file left behind


@pytest.mark.parametrize("reply, right", [
    ("48 + 24 = 72\n#### 72", True),
    ("#### 72.0", True),                    # numeric comparison
    ("first #### 70, then\n#### 72", True),  # the last #### is the answer
    ("#### 1,072", False), ("#### -72", False), ("#### 7.2", False),
    ("the answer is 72", False),            # no #### at all
])
def test_gsm8k_scoring_of_tricky_replies(reply, right):
    task = build_task("GSM8K")
    conversation = {**task[0], "answer": "72"}
    assert task.evaluate(conversation, reply) is right
    big = {**task[0], "answer": "-1250.5"}
    assert task.evaluate(big, "#### -1,250.50") and not task.evaluate(big, "#### 1250.5")
