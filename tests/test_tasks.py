"""Conversation tasks on the offline files (counts, rendering, masks, grading), the hub path through
`datasets` on local snapshots of the hub's layout, GSM8K's tool calls through the engine, and mixtures."""
import gzip
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from raychat.common import UserError
from raychat.tasks.arc import ARC
from raychat.tasks.common import chat_data_dir, multiple_choice
from raychat.tasks.gsm8k import GSM8K, extract_answer, solution_parts
from raychat.tasks.humaneval import HumanEval
from raychat.tasks.identity import Identity
from raychat.tasks.mixture import TaskMixture, build_mixture, parse_mixture
from raychat.tasks.mmlu import MMLU
from raychat.tasks.smoltalk import SmolTalk
from raychat.tasks.spelling import CountLetter, SpellWord, fetch_words, load_words


def _rows(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _trained_text(tokenizer, conversation):
    """The text of the tokens the loss mask selects (what SFT trains on)."""
    ids, mask = tokenizer.render_conversation(conversation)
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


# ---------------------------------------------------------------------------------- offline loaders

@pytest.mark.parametrize("task, count", [
    (lambda: ARC("ARC-Easy", "train"), 2251), (lambda: ARC("ARC-Easy", "validation"), 570),
    (lambda: ARC("ARC-Easy", "test"), 2376), (lambda: ARC("ARC-Challenge", "train"), 1119),
    (lambda: ARC("ARC-Challenge", "validation"), 299), (lambda: ARC("ARC-Challenge", "test"), 1172),
    (lambda: MMLU("auxiliary_train", "train"), 4957 + 2251 + 1119),   # stand-in: OpenBookQA + ARC train
    (lambda: MMLU("all", "test"), 1531),                               # stand-in: MMLU validation
    (lambda: GSM8K("train"), 7473), (lambda: GSM8K("test"), 1319),
    (lambda: SmolTalk("train"), 85), (lambda: SmolTalk("test"), 10),  # stand-in: 95 OASST conversations
    (lambda: HumanEval(), 164),
])
def test_offline_loaders_count_every_row(data_dir, task, count):
    assert len(task()) == count


def test_limit_keeps_the_first_rows(data_dir):
    full, first = GSM8K("train"), GSM8K("train", limit=5)
    assert len(first) == 5 and [first[i] for i in range(5)] == [full[i] for i in range(5)]
    with pytest.raises(IndexError):
        first[5]


def test_multiple_choice_renders_lettered_choices_and_trains_on_the_letter(tokenizer):
    conversation = multiple_choice("What is 2 + 2?", ["3", "4", "5"], 1)
    assert conversation["messages"][0]["content"] == (
        "What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\n\nAnswer with the letter of the correct choice.")
    assert conversation["messages"][1]["content"] == "B" and conversation["letters"] == ["A", "B", "C"]
    assert _trained_text(tokenizer, conversation) == "B<|assistant_end|>"


def test_arc_offline_rows_become_the_hub_schema_and_numeric_labels_become_letters(data_dir):
    raw = _rows(data_dir / "arc" / "ARC-Easy-Train.jsonl.gz")
    task = ARC("ARC-Easy", "train")
    first = task[0]
    assert first["messages"][0]["content"].startswith(raw[0]["question"]["stem"] + "\n\nA. ")
    assert first["answer"] == raw[0]["answerKey"]   # A-D labelled: the same letter
    k = next(i for i, r in enumerate(raw) if r["question"]["choices"][0]["label"] == "1")
    row = raw[k]
    labels = [c["label"] for c in row["question"]["choices"]]
    assert task[k]["answer"] == "ABCDE"[labels.index(row["answerKey"])]
    assert task.evaluate(task[k], f" {task[k]['answer']}.") and not task.evaluate(task[k], "Z")


def test_mmlu_stand_ins(data_dir):
    aux = MMLU("auxiliary_train", "train")
    obqa = _rows(data_dir / "openbookqa" / "train.jsonl.gz")
    assert aux[0]["messages"][0]["content"].startswith(obqa[0]["question"]["stem"])
    assert aux[0]["answer"] == obqa[0]["answerKey"]
    test = MMLU("all", "test")
    row = _rows(data_dir / "mmlu" / "validation.jsonl.gz")[0]
    assert test[0]["answer"] == "ABCD"[row["answer"]] and test.eval_type == "categorical"
    for subset, split in (("auxiliary_train", "test"), ("all", "train")):
        with pytest.raises(ValueError, match="MMLU"):
            MMLU(subset, split)


def test_gsm8k_annotations_become_calculator_calls(data_dir, tokenizer):
    conversation = GSM8K("train")[0]
    assert conversation["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert conversation["answer"] == "72"
    # the expressions are trained on, the tool's output is not
    trained = _trained_text(tokenizer, conversation)
    assert "<|python_start|>48/2<|python_end|>" in trained and "<|output_start|>" not in trained
    # the output is what the calculator prints; the annotation's result only where it refuses
    assert solution_parts("x <<8*18=144.00>>144.00")[2] == {"type": "python_output", "text": "144"}
    assert solution_parts("<<560//10=56>>56")[1] == {"type": "python_output", "text": "56"}
    task = GSM8K("test")
    assert task.evaluate(task[0], f"so #### {task[0]['answer']}") and not task.evaluate(task[0], "#### 1e9")
    assert extract_answer("#### 1,250.5") == "1250.5" and extract_answer("no answer") is None


def test_smoltalk_stand_in_is_the_oasst_conversations(data_dir, tokenizer):
    rows = _rows(data_dir / "chat" / "oasst_en_100_conversations.jsonl.gz")
    assert SmolTalk("train")[0]["messages"] == rows[0]["messages"]
    assert SmolTalk("test")[9]["messages"] == rows[-1]["messages"]
    conversation = SmolTalk("train")[3]
    trained = _trained_text(tokenizer, conversation)
    replies = [m["content"] for m in conversation["messages"] if m["role"] == "assistant"]
    assert trained == "".join(reply + "<|assistant_end|>" for reply in replies)


def test_humaneval_program_runs_the_tests(data_dir, tmp_path):
    """The canonical solution passes its tests and a wrong one fails (the canonical code is trusted; a model's
    would go to chat evaluation's sandbox)."""
    task = HumanEval()

    def run(program):
        path = tmp_path / "program.py"
        path.write_text(program)
        return subprocess.run([sys.executable, str(path)], capture_output=True, timeout=60).returncode == 0

    for i in (0, 2, 163):
        conversation = task[i]
        reply = conversation["messages"][1]["content"]
        assert task.evaluate(conversation, f"Here it is:\n```python\n{reply}```\n", execute=run)
        body = reply[len(conversation["prompt"]):]
        assert task.evaluate(conversation, body, execute=run)   # only the body: the prompt goes in front
        assert not task.evaluate(conversation, "    return None\n", execute=run)
    with pytest.raises(ValueError, match="sandbox"):
        task.evaluate(task[0], "pass")


# ------------------------------------------------------------------------------------ generated tasks

def test_word_list_offline_and_through_datasets_agree(data_dir, tmp_path):
    words = load_words()
    assert len(words) == 370_099 and words[:3] == ("a", "aa", "aaa")
    path = fetch_words(str(data_dir / "words" / "words_alpha.txt.gz"), tmp_path / "words.txt")
    assert tuple(path.read_text().split("\n")[:-1]) == words


def test_spelling_tasks_are_deterministic_and_graded(data_dir, tokenizer):
    from raychat.calculator import calculate
    spell = SpellWord(50)
    assert [spell[i] for i in range(50)] == [SpellWord(50)[i] for i in range(50)]
    assert [spell[i] for i in range(50)] != [SpellWord(50, split="test")[i] for i in range(50)]
    assert [spell[i] for i in range(50)] != [SpellWord(50, seed=7)[i] for i in range(50)]
    c = spell[0]
    assert c["messages"][1]["content"] == "-".join(c["word"]) and c["word"] in c["messages"][0]["content"]
    assert spell.evaluate(c, f"It is {'-'.join(c['word'])}.") and not spell.evaluate(c, "x-y-z")
    count = CountLetter(200)
    answers = Counter()
    for i in range(200):
        c = count[i]
        truth = c["word"].count(c["letter"])
        parts = c["messages"][1]["content"]
        python = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert c["answer"] == output == calculate(python) == str(truth)
        assert count.evaluate(c, parts[-1]["text"]) and not count.evaluate(c, f"#### {truth + 1}")
        tokenizer.render_conversation(c)
        answers[truth == 0] += 1
    assert answers[True] > 10 and answers[False] > 100   # absent letters too, mostly present ones


def test_identity_conversations_are_generated_deterministically(tokenizer):
    task = Identity(300)
    conversations = [task[i] for i in range(300)]
    assert conversations == [Identity(300)[i] for i in range(300)]
    assert conversations != [Identity(300, seed=1)[i] for i in range(300)]
    assert len({json.dumps(c) for c in conversations}) > 250   # varied
    for c in conversations:
        tokenizer.render_conversation(c)   # valid: user/assistant alternating
    replies = " ".join(m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant")
    assert replies.count("raychat") > 200 and "ChatGPT" in replies


# ---------------------------------------------------------------------------------------- mixtures

def test_mixture_is_deterministic_and_oversamples_as_asked(data_dir):
    spec = "gsm8k:30,identity:20*3,spelling:10"
    a, b = build_mixture(spec, seed=5), build_mixture(spec, seed=5)
    assert len(a) == 30 + 60 + 10
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert list(a.order) != list(build_mixture(spec, seed=6).order)
    seen = Counter(a.locate(i) for i in range(len(a)))
    assert all(seen[(0, r)] == 1 for r in range(30)) and all(seen[(1, r)] == 3 for r in range(20))
    assert all(seen[(2, r)] == 1 for r in range(10)) and len(seen) == 60
    assert a.describe() == {"gsm8k-train": 30, "identity": 60, "spelling": 10}
    positions = [i for i in range(len(a)) if a.locate(i)[0] == 1]
    assert positions != list(range(positions[0], positions[0] + 60))   # shuffled, not one block
    # the same task twice is oversampling too
    twice = TaskMixture([(GSM8K("train", limit=4), 1), (GSM8K("train", limit=4), 1)])
    expected = 2 * [json.dumps(GSM8K("train")[i]) for i in range(4)]
    assert sorted(json.dumps(twice[i]) for i in range(8)) == sorted(expected)


def test_mixture_strings_are_checked():
    assert parse_mixture("smoltalk, gsm8k:100*2 ,identity*2") == [("smoltalk", -1, 1), ("gsm8k", 100, 2),
                                                                 ("identity", -1, 2)]
    with pytest.raises(UserError, match="sft.mixture: unknown task 'wiki'"):
        parse_mixture("wiki", "sft.mixture")
    with pytest.raises(UserError, match=r"cannot read 'gsm8k:x'"):
        parse_mixture("gsm8k:x")
    with pytest.raises(UserError, match="selects no conversation"):
        parse_mixture("gsm8k*0")


# --------------------------------------------------------------------- the hub path, on local files

def _hub_snapshot(root, data_dir, rows=12):
    """Local copies of the hub dataset repos, in the hub's layout (parquet per config/split, README with the
    configs), built from the offline files: `datasets.load_dataset("owner/name", config)` resolves a local
    directory of that name before the hub."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from raychat.tasks.arc import from_ai2

    def write(repo, config, split, records):
        folder = root / repo / (config or "data")
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), folder / f"{split}-00000-of-00001.parquet")
        readme = root / repo / "README.md"
        entries = readme.read_text().split("---\n")[1] if readme.exists() else "configs:\n"
        entries += (f"- config_name: {config or 'default'}\n  data_files:\n  - split: {split}\n"
                    f"    path: {config or 'data'}/{split}-*\n")
        readme.write_text(f"---\n{entries}---\n")

    write("allenai/ai2_arc", "ARC-Easy", "train",
          [from_ai2(r) for r in _rows(data_dir / "arc" / "ARC-Easy-Train.jsonl.gz")[:rows]])
    write("openai/gsm8k", "main", "train", _rows(data_dir / "gsm8k" / "train.jsonl.gz")[:rows])
    mmlu = _rows(data_dir / "mmlu" / "validation.jsonl.gz")[:rows]
    write("cais/mmlu", "auxiliary_train", "train", [{"train": r} for r in mmlu])   # the hub nests these rows
    write("HuggingFaceTB/smol-smoltalk", None, "train",
          [{"messages": r["messages"], "source": "oasst"} for r in
           _rows(data_dir / "chat" / "oasst_en_100_conversations.jsonl.gz")[:rows]])
    write("openai/openai_humaneval", None, "test", _rows(data_dir / "humaneval" / "HumanEval.jsonl.gz")[:rows])
    return mmlu


def test_hub_path_through_datasets_saves_the_rows_for_the_workers(data_dir, tmp_path, monkeypatch):
    import datasets
    snapshot = tmp_path / "hub"
    mmlu_rows = _hub_snapshot(snapshot, data_dir)
    offline = {"arc": ARC("ARC-Easy", "train", limit=12), "gsm8k": GSM8K("train", limit=12),
               "smoltalk": SmolTalk("train", limit=12), "humaneval": HumanEval(limit=12)}
    monkeypatch.delenv("RAYCHAT_DATA_DIR")
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.chdir(snapshot)
    # a worker (download=False) never fetches: the driver must have
    with pytest.raises(UserError, match="the training driver fetches the chat datasets"):
        GSM8K("train", download=False)
    hub = {"arc": ARC("ARC-Easy", "train"), "gsm8k": GSM8K("train"), "smoltalk": SmolTalk("train"),
           "humaneval": HumanEval()}
    for name, task in hub.items():
        assert len(task) == 12
        assert [task[i] for i in range(12)] == [offline[name][i] for i in range(12)], name
    aux = MMLU("auxiliary_train", "train")
    assert [aux[i]["answer"] for i in range(12)] == ["ABCD"[r["answer"]] for r in mmlu_rows]
    saved = sorted(p.name for p in chat_data_dir().iterdir())
    assert saved == ["ai2_arc-ARC-Easy-train.parquet", "gsm8k-main-train.parquet",
                     "mmlu-auxiliary_train-train.parquet", "openai_humaneval-test.parquet",
                     "smol-smoltalk-train.parquet"]   # nothing half-written next to them
    # the workers read the saved rows: no hub needed any more
    monkeypatch.chdir(tmp_path)
    worker = GSM8K("train", download=False)
    assert [worker[i] for i in range(12)] == [offline["gsm8k"][i] for i in range(12)]
    # a split the hub does not have: one line, and the way out
    monkeypatch.chdir(snapshot)
    with pytest.raises(UserError, match=r"could not load allenai/ai2_arc \(ARC-Challenge, train\) from the "
                                        r"Hugging Face hub: .*set RAYCHAT_DATA_DIR"):
        ARC("ARC-Challenge", "train")


# ------------------------------------------------------------------ GSM8K tool calls through the engine

def _scripted_model(tokenizer, script):
    """A real GPT (real KV cache, real engine plumbing) whose next token is scripted: with n tokens in its
    cache it predicts script[n], whatever the weights say."""
    from raychat.model import GPT, GPTConfig

    class Scripted(GPT):
        def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", *, last_only=False, weights=None):
            self.hidden_states(idx, kv_cache)
            logits = torch.full((idx.size(0), 1, self.config.vocab_size), -100.0)
            for b in range(idx.size(0)):
                logits[b, 0, script[kv_cache.lengths[kv_cache.row_start + b]]] = 100.0
            return logits

    with torch.device("meta"):
        model = Scripted(GPTConfig(depth=1, vocab_size=tokenizer.get_vocab_size(), sequence_len=1024))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


def test_tool_calls_round_trip_through_the_engine(data_dir, tokenizer):
    """A model that writes GSM8K's (and the spelling task's) calculator calls gets the rendered outputs forced
    in by the engine: the generated reply is the rendered conversation token for token, and exactly the
    tool output (mask 0 in the rendering) is forced, everything else sampled (mask 1)."""
    from raychat.calculator import calculate
    from raychat.engine import Engine
    conversations = [GSM8K("train")[i] for i in range(12)] + [CountLetter(4)[i] for i in range(4)]
    assert all(calculate(p["text"]) is not None for c in conversations for p in c["messages"][1]["content"]
               if p["type"] == "python")
    output_start = tokenizer.encode_special("<|output_start|>")
    for conversation in conversations:
        ids, mask = tokenizer.render_conversation(conversation)
        prompt = tokenizer.render_for_completion(conversation)
        assert ids[:len(prompt)] == prompt
        engine = Engine(_scripted_model(tokenizer, ids + [ids[-1]]), tokenizer)
        results, masks = engine.generate_many([prompt], max_tokens=len(ids) + 5, temperature=0.0)
        assert results[0] == ids[:-1]                         # stopped at <|assistant_end|> (not reported)
        assert masks[0][len(prompt):] == mask[len(prompt):-1]   # forced exactly where the output is
        assert output_start in results[0][len(prompt):]
