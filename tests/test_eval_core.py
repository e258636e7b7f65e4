"""CORE: task list, prompt rendering, few-shot sampling, and scoring of the three task types checked
against a hand computation from the model's own forward pass (one row at a time, no padding)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evalkit import small_bundle, tiny_gpt
from raychat.common import UserError
from raychat.config import load_config
from raychat.eval.base import format_table
from raychat.eval.core import (CoreTask, centered_accuracy, evaluate_core, item_token_spans, load_core_tasks,
                               load_task_rows, prepare_task_items, present_and_missing, render_item, sample_fewshot,
                               score_item, task_data_path)

MISSING_OFFLINE = {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}


# ------------------------------------------------------------------------------ hand-computed reference

def _forward_one(model, row: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([row]))[0].double()


def _mean_loss(model, row: list[int], start: int) -> float:
    """Mean negative log-likelihood of row[start:] given everything before it."""
    logp = F.log_softmax(_forward_one(model, row), dim=-1)
    return -sum(logp[i - 1, row[i]].item() for i in range(start, len(row))) / (len(row) - start)


def hand_correct(model, tokenizer, item: dict) -> bool:
    bos = tokenizer.get_bos_token_id()
    rows = [[bos] + tokenizer.encode(p) for p in item["prompts"]]
    assert max(map(len, rows)) <= model.config.sequence_len, "test item would be cropped"
    if item["task_type"] == "language_modeling":
        context, full = rows
        assert full[:len(context)] == context
        predicted = _forward_one(model, full).argmax(dim=-1)
        return all(predicted[i - 1].item() == full[i] for i in range(len(context), len(full)))
    if item["task_type"] == "multiple_choice":   # scored from the first token where the options differ
        start = next(i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1)
        losses = [_mean_loss(model, r, start) for r in rows]
    else:                                         # schema: scored on the options' common ending
        shared = 0
        while shared < min(map(len, rows)) - 1 and len({r[-1 - shared] for r in rows}) == 1:
            shared += 1
        losses = [_mean_loss(model, r, len(r) - shared) for r in rows]
    return min(range(len(losses)), key=losses.__getitem__) == item["gold"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt(tokenizer.get_vocab_size(), seed=1, sequence_len=1024)


@pytest.fixture(scope="module")
def bundle(data_dir, tmp_path_factory):
    return small_bundle(data_dir, tmp_path_factory.mktemp("core") / "bundle")


# ----------------------------------------------------------------------------------------- the tasks

def test_offline_bundle_has_the_22_tasks_and_reports_the_4_missing(data_dir):
    bundle = data_dir / "core_eval"
    tasks = {t.label: t for t in load_core_tasks(bundle)}
    assert len(tasks) == 22
    assert tasks["boolq"].random_baseline == 62 and tasks["bigbench_language_identification"].random_baseline == 9.1
    assert tasks["commonsense_qa"].random_baseline == 20  # v1 baselines, as in nanochat's bundle
    assert tasks["arc_easy"].delimiter == "\nAnswer: " and tasks["copa"].delimiter == " "
    assert tasks["agi_eval_lsat_ar"].num_fewshot == 3 and tasks["winogrande"].task_type == "schema"
    present, missing = present_and_missing(bundle)
    assert {t.label for t in missing} == MISSING_OFFLINE
    assert len(present) == 18 and all(path.name.endswith(".jsonl.gz") for _, path in present)


def test_plain_jsonl_is_read_before_the_gz_copy(data_dir, tmp_path):
    bundle = small_bundle(data_dir, tmp_path / "b", gzipped=False, rows=3)
    copa = next(t for t in load_core_tasks(bundle) if t.label == "copa")
    path = task_data_path(bundle, copa)
    assert path.name == "copa.jsonl" and len(load_task_rows(path)) == 3
    path.rename(path.with_name("copa.jsonl.gz"))  # not gzip inside: a clear error, not a traceback
    with pytest.raises(UserError, match="copa.jsonl.gz"):
        load_task_rows(task_data_path(bundle, copa))


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25) == 0.0
    assert centered_accuracy(1.0, 25) == 1.0
    assert centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert centered_accuracy(0.31, 0) == pytest.approx(0.31)
    assert centered_accuracy(0.4, 50) == pytest.approx(-0.2)   # below chance is negative


# ---------------------------------------------------------------------------------- prompt rendering

def test_render_multiple_choice_with_fewshot():
    task = CoreTask("t", "x.jsonl", "multiple_choice", 1, "\nAnswer: ", 25)
    row = {"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1}
    shot = {"query": "Question: 1+1?", "choices": ["2", "5"], "gold": 0}
    item = render_item(task, row, [shot])
    assert item["prompts"] == ["Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer: 3",
                               "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer: 4"]
    assert item["gold"] == 1


def test_render_schema_and_language_modeling():
    schema = CoreTask("w", "x.jsonl", "schema", 1, " ", 50)
    item = render_item(schema, {"context_options": ["Ann thanked Bo because Ann", "Ann thanked Bo because Bo"],
                                "continuation": "had helped.", "gold": 1},
                       [{"context_options": ["It fell so it", "It fell so the cup"], "continuation": "broke.", "gold": 0}])
    assert item["prompts"] == ["It fell so it broke.\n\nAnn thanked Bo because Ann had helped.",
                               "It fell so it broke.\n\nAnn thanked Bo because Bo had helped."]
    lm = CoreTask("l", "x.jsonl", "language_modeling", 0, "\nA: ", 0)
    item = render_item(lm, {"context": "Q: capital of France?", "continuation": "Paris"}, [])
    # the context-only prompt loses its trailing whitespace, so its tokens stay a prefix of the full prompt's
    assert item["prompts"] == ["Q: capital of France?\nA:", "Q: capital of France?\nA: Paris"]
    assert item["gold"] is None


def test_malformed_rows_are_user_errors():
    task = CoreTask("t", "x.jsonl", "multiple_choice", 0, " ", 25)
    with pytest.raises(UserError, match="malformed row"):
        render_item(task, {"query": "q", "gold": 0}, [])
    with pytest.raises(UserError, match="gold 3 out of range"):
        render_item(task, {"query": "q", "choices": ["a", "b"], "gold": 3}, [])


def test_fewshot_sampling_is_fixed_per_item_and_never_the_item_itself():
    for index in (0, 5, 9):
        picks = sample_fewshot(10, index, 4)
        assert picks == sample_fewshot(10, index, 4)
        assert len(set(picks)) == 4 and index not in picks and all(0 <= j < 10 for j in picks)
    assert sorted(sample_fewshot(4, 2, 10)) == [0, 1, 3]   # capped at the other rows
    assert sample_fewshot(1, 0, 3) == [] and sample_fewshot(50, 7, 0) == []
    assert len({tuple(sample_fewshot(1000, i, 10)) for i in range(20)}) == 20   # differs between items


def test_prepare_caps_deterministically_and_uses_fewshot_from_other_rows(bundle):
    arc = next(t for t in load_core_tasks(bundle) if t.label == "arc_easy")
    rows = load_task_rows(task_data_path(bundle, arc))
    items = prepare_task_items(arc, rows, 5)
    assert len(items) == 5 and items == prepare_task_items(arc, rows, 5)
    assert len(prepare_task_items(arc, rows, -1)) == len(rows)
    queries = [r["query"] for r in rows]
    for item in items:
        blocks = item["prompts"][0].split("\n\n")
        assert len(blocks) == 3   # 2 solved examples + the question
        shots = [b.split("\nAnswer: ")[0] for b in blocks[:2]]
        question = blocks[2].split("\nAnswer: ")[0]
        assert all(s in queries for s in shots) and question in queries and question not in shots
    with pytest.raises(UserError, match="-1"):
        prepare_task_items(arc, rows, 0)


# ----------------------------------------------------------------------------------------- scoring

def test_each_task_type_scores_as_computed_by_hand(model, tokenizer, bundle):
    outcomes = {"multiple_choice": [], "schema": [], "language_modeling": []}
    for task in load_core_tasks(bundle):
        path = task_data_path(bundle, task)
        if path is None:
            continue
        for item in prepare_task_items(task, load_task_rows(path), 6):
            got = score_item(model, tokenizer, item, "cpu", model.config.sequence_len)
            assert got == hand_correct(model, tokenizer, item), (task.label, item["prompts"][0][-120:])
            outcomes[task.task_type].append(got)
    # the comparison means something only if both answers occur
    assert True in outcomes["multiple_choice"] + outcomes["schema"]
    assert False in outcomes["multiple_choice"] + outcomes["schema"]
    assert len(outcomes["language_modeling"]) == 6


def test_language_modeling_is_correct_exactly_when_greedy_reproduces_the_continuation(model, tokenizer):
    """Build an item whose continuation is the model's own greedy output: it must score correct, and
    changing its last character must make it wrong."""
    task = CoreTask("lm", "x.jsonl", "language_modeling", 0, "", 0)
    bos = tokenizer.get_bos_token_id()
    for context in ["The cat sat on the", "Water boils at", "In 1905, Einstein", "The answer is", "Paris is the"]:
        row = [bos] + tokenizer.encode(context)
        generated = []
        for _ in range(3):
            generated.append(int(_forward_one(model, row + generated)[-1].argmax()))
        continuation = tokenizer.decode(generated)
        item = render_item(task, {"context": context, "continuation": continuation}, [])
        if [bos] + tokenizer.encode(item["prompts"][1]) != row + generated or item["prompts"][0] != context:
            continue  # the text does not re-tokenize to the same ids; try another context
        assert score_item(model, tokenizer, item, "cpu") is True
        wrong = render_item(task, {"context": context, "continuation": continuation[:-1] + "\u00a7"}, [])
        assert score_item(model, tokenizer, wrong, "cpu") is False
        break
    else:
        pytest.fail("no context whose greedy continuation re-tokenizes identically")


def test_spans_and_left_crop():
    mc = {"task_type": "multiple_choice", "prompts": [], "gold": 0}
    assert item_token_spans(mc, [[9, 1, 2, 3], [9, 1, 4]])[1] == [(2, 4), (2, 3)]
    # one option a prefix of the other: the shorter still scores its last token
    assert item_token_spans(mc, [[9, 1, 2], [9, 1, 2, 5]])[1] == [(2, 3), (2, 4)]
    schema = {"task_type": "schema", "prompts": [], "gold": 0}
    assert item_token_spans(schema, [[9, 1, 7, 8], [9, 2, 2, 7, 8]])[1] == [(2, 4), (3, 5)]
    lm = {"task_type": "language_modeling", "prompts": [], "gold": None}
    assert item_token_spans(lm, [[9, 1, 2], [9, 1, 2, 3, 4]]) == ([[9, 1, 2, 3, 4]], [(3, 5)])


def test_long_prompts_are_cropped_from_the_left(tokenizer):
    short_model = tiny_gpt(tokenizer.get_vocab_size(), seed=2, sequence_len=16)
    task = CoreTask("t", "x.jsonl", "multiple_choice", 0, " ", 50)
    item = render_item(task, {"query": "word " * 40, "choices": ["yes it is", "no it is not"], "gold": 0}, [])
    got = score_item(short_model, tokenizer, item, "cpu", short_model.config.sequence_len)
    bos = tokenizer.get_bos_token_id()
    rows = [[bos] + tokenizer.encode(p) for p in item["prompts"]]
    start = next(i for i in range(min(map(len, rows))) if rows[0][i] != rows[1][i])
    losses = []
    for row in rows:   # keep the last 16 tokens: the scored ones are at the end
        cut = len(row) - 16
        losses.append(_mean_loss(short_model, row[cut:], start - cut))
    assert got == (losses[0] < losses[1])


# ------------------------------------------------------------------------------------ whole evaluation

def reference_core(model, tokenizer, bundle, max_per_task):
    present, _ = present_and_missing(bundle)
    centered = {}
    for task, path in present:
        items = prepare_task_items(task, load_task_rows(path), max_per_task)
        accuracy = sum(hand_correct(model, tokenizer, item) for item in items) / len(items)
        centered[task.label] = (accuracy - task.random_baseline / 100) / (1 - task.random_baseline / 100)
    return centered


def test_evaluate_core_reports_missing_tasks_and_averages_the_present(model, tokenizer, bundle):
    cfg = load_config("demo")
    result = evaluate_core(model, tokenizer, cfg, max_per_task=5, device="cpu", bundle=bundle)
    expected = reference_core(model, tokenizer, bundle, 5)
    assert result["missing_tasks"] == ["hellaswag"] and result["partial"]
    assert result["num_tasks"] == 4 and result["num_tasks_total"] == 5
    assert set(result["tasks"]) == set(expected)
    for label, centered in expected.items():
        assert result["tasks"][label]["centered"] == pytest.approx(centered)
        assert result["tasks"][label]["num_examples"] == 5
    assert result["core"] == pytest.approx(sum(expected.values()) / 4)
    assert model.training is False and math.isfinite(result["core"])
    table = format_table(result)
    assert "missing (no data file in the bundle): hellaswag" in table and "partial" in table and "4 of 5" in table


def test_evaluate_core_fails_clearly_when_no_task_has_data(model, tokenizer, tmp_path, data_dir):
    bundle = small_bundle(data_dir, tmp_path / "b", rows=2)
    for path in (bundle / "eval_data").rglob("*.gz"):
        path.unlink()
    with pytest.raises(UserError, match="every task's data file is missing"):
        evaluate_core(model, tokenizer, load_config("demo"), 2, "cpu", bundle=bundle)


def test_core_on_ray_actors_equals_in_process(model, tokenizer, bundle, ray_cluster):
    from raychat.eval.base import evaluate_core_ray
    cfg = load_config("demo")
    expected = evaluate_core(model, tokenizer, cfg, max_per_task=6, device="cpu", bundle=bundle)
    got = evaluate_core_ray(model, tokenizer, cfg, max_per_task=6, num_actors=2, use_gpu=False, bundle=bundle)
    assert got == expected
