"""`raychat eval chat`: a chat model scored on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and the
spelling bee, spread over a model pool (raychat.pool), summarised as ChatCORE.

Two kinds of task:

- categorical (ARC, MMLU): the question is rendered for completion (it ends with <|assistant_start|>),
  one forward pass, and the answer is the choice letter whose logit at that position is highest, among
  the letters of that question only (the model is not asked to generate, so a model that would ramble
  still gets a fair multiple-choice score). Problems go through the model in padded batches.
- generative (GSM8K, HumanEval, SpellingBee): `num_samples` replies sampled with the Engine, the
  calculator live; each reply is graded by its task (GSM8K and the spelling bee: the final `####`
  number; HumanEval: the task's unit tests run in the sandbox, raychat.eval.sandbox). pass@k, k = 1..K,
  is the unbiased estimate 1 - C(n-c, k) / C(n, k) from n samples with c correct.

A task's accuracy is its pass@1 (categorical: the share answered right). Centered accuracy is
(accuracy - baseline) / (1 - baseline), the baseline being what guessing scores: 1/choices for a
multiple-choice question (0.25 for 4-way), 0 for a generative task. ChatCORE is the mean centered
accuracy over the tasks evaluated (flagged partial when a task was left out).

Problems are cut into chunks of a fixed size (eval.batch_size), each chunk computed the same way on
whichever actor is free, with seeds derived from the problem's index: the numbers are the same whether
1 or N actors run them.
"""
from __future__ import annotations

import csv
import io
import json
import time
from math import comb

import torch

from raychat.common import UserError, atomic_write, get_logger, init_ray, report_dir
from raychat.engine import Engine, derive_seed
from raychat.model import LOGIT_SOFTCAP, autocast_context
from raychat.pool import ModelPool, ModelWorker, chunked
from raychat.train.step import pad_rows

log = get_logger()

SPELLING_BEE_SIZE = 256  # generated test problems (before --max-problems)
NUM_EXAMPLES, EXAMPLE_CHARS = 3, 400  # replies kept in the JSON per task, to see what the model wrote


def build_task(name: str, download: bool = True):
    """The evaluation split of a task by its report name."""
    from raychat.tasks.arc import ARC
    from raychat.tasks.gsm8k import GSM8K
    from raychat.tasks.humaneval import HumanEval
    from raychat.tasks.mmlu import MMLU
    from raychat.tasks.spelling import CountLetter
    builders = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", download=download),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", download=download),
        "MMLU": lambda: MMLU("all", "test", download=download),
        "GSM8K": lambda: GSM8K("test", download=download),
        "HumanEval": lambda: HumanEval(download=download),
        "SpellingBee": lambda: CountLetter(SPELLING_BEE_SIZE, split="test", download=download),
    }
    return builders[name]()


TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def parse_tasks(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASK_NAMES]
    if unknown or not names:
        raise UserError(f"unknown chat task(s) {', '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(TASK_NAMES)} (comma-separated, --tasks or eval.chat_tasks)")
    return list(dict.fromkeys(names))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n is correct."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


# ---------------------------------------------------------------------------------------- the actors

class ChatEvalWorker(ModelWorker):
    """A pool actor that answers chunks of problems of one task and grades them."""

    def __init__(self, model, tokenizer, use_gpu: bool):
        super().__init__(model, tokenizer, use_gpu)
        self.tasks: dict = {}

    def task(self, name: str):
        if name not in self.tasks:  # the driver fetched every dataset already: nothing is downloaded here
            self.tasks[name] = build_task(name, download=False)
        return self.tasks[name]

    def run(self, chunk: dict) -> list:
        with torch.inference_mode(), autocast_context(self.device):
            if chunk["type"] == "categorical":
                return self.categorical(chunk["problems"])
            return self.generative(chunk["task"], chunk["problems"], **chunk["sampling"])

    def categorical(self, problems: list[dict]) -> list[dict]:
        letters = choose_letters(self.model, self.tokenizer, problems, self.device)
        return [{"correct": [letter == p["conversation"]["answer"]], "replies": [letter]}
                for letter, p in zip(letters, problems)]

    def generative(self, task_name: str, problems: list[dict], num_samples: int, max_tokens: int,
                   temperature: float, top_k: int | None, seed: int, max_batch_size: int) -> list[dict]:
        from raychat.eval.sandbox import execute
        task = self.task(task_name)
        prompts = [p["prompt"] for p in problems]
        sequences, _ = Engine(self.model, self.tokenizer).generate_many(
            prompts, num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            seeds=[derive_seed(seed, p["index"]) for p in problems], max_batch_size=max(max_batch_size, num_samples))
        graded = []
        for i, problem in enumerate(problems):
            replies = [self.tokenizer.decode(sequence[len(problem["prompt"]):])
                       for sequence in sequences[i * num_samples:(i + 1) * num_samples]]
            if task_name == "HumanEval":  # model-written code runs only in the sandbox
                correct = [task.evaluate(problem["conversation"], reply,
                                         execute=lambda program: execute(program).success) for reply in replies]
            else:
                correct = [task.evaluate(problem["conversation"], reply) for reply in replies]
            graded.append({"correct": correct, "replies": replies})
        return graded


def choose_letters(model, tokenizer, problems: list[dict], device: str) -> list[str]:
    """For each problem, the letter among its choices with the highest logit right after its prompt.
    One padded forward pass (`pad_rows`)."""
    lengths = [len(p["prompt"]) for p in problems]
    ids = pad_rows([p["prompt"] for p in problems], 0)
    hidden = model.hidden_states(ids.to(device), None)
    last = hidden[torch.arange(len(problems)), torch.tensor(lengths) - 1]
    logits = model.lm_head(last).float()
    logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
    chosen = []
    for row, p in enumerate(problems):
        letters = p["conversation"]["letters"]
        letter_ids = [letter_token(tokenizer, letter) for letter in letters]
        chosen.append(letters[int(torch.argmax(logits[row, letter_ids]))])
    return chosen


def letter_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"the answer letter {letter!r} is not a single token ({ids})")
    return ids[0]


# ---------------------------------------------------------------------------------------- the driver

def render_problems(task, tokenizer, max_problems: int, max_prompt_tokens: int) -> tuple[list[dict], int]:
    """The task's problems with their prompt ids (the first `max_problems`; -1 = all). Problems whose
    prompt does not leave room for an answer in the model's context are skipped (counted)."""
    count = len(task) if max_problems < 0 else min(len(task), max_problems)
    problems, skipped = [], 0
    for index in range(count):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) > max_prompt_tokens:
            skipped += 1
            continue
        problems.append({"index": index, "conversation": conversation, "prompt": prompt})
    return problems, skipped


def summarize_task(name: str, eval_type: str, problems: list[dict], graded: list, num_samples: int,
                   skipped: int) -> dict:
    """Accuracy (= pass@1), pass@k, baseline and centered accuracy of one task; `graded` has, per problem,
    "correct" (one bool per sample) and "replies" (the first few are kept as examples)."""
    correct = [g["correct"] for g in graded]
    if eval_type == "categorical":
        baseline = sum(1 / len(p["conversation"]["letters"]) for p in problems) / max(1, len(problems))
        ks = [1]
    else:
        baseline, ks = 0.0, list(range(1, num_samples + 1))
    n = len(problems)
    passes = {k: (sum(pass_at_k(len(c), sum(c), k) for c in correct) / n if n else 0.0) for k in ks}
    accuracy = passes[1]
    return {"task": name, "eval_type": eval_type, "num_problems": n, "skipped": skipped,
            "num_samples": 1 if eval_type == "categorical" else num_samples, "accuracy": accuracy,
            "pass_at_k": {str(k): v for k, v in passes.items()}, "baseline": baseline,
            "centered": (accuracy - baseline) / (1 - baseline),
            "examples": [{"index": p["index"], "replies": [r[:EXAMPLE_CHARS] for r in g["replies"]], "correct": g["correct"]}
                         for p, g in zip(problems[:NUM_EXAMPLES], graded)]}


def evaluate_chat(pool: ModelPool, tokenizer, task_names: list[str], max_problems: int, num_samples: int,
                  sampling: dict, batch_size: int, max_prompt_tokens: int) -> dict:
    """Every task's results (see `summarize_task`) and ChatCORE, the problems spread over `pool`."""
    plan = []   # (task, eval type, problems, skipped)
    chunks = []
    for name in task_names:
        task = build_task(name)
        problems, skipped = render_problems(task, tokenizer, max_problems, max_prompt_tokens)
        eval_type = task.eval_type
        plan.append((name, eval_type, problems, skipped))
        size = batch_size if eval_type == "categorical" else max(1, batch_size // num_samples)
        for part in chunked(problems, size):
            chunk = {"task": name, "type": eval_type, "problems": part}
            if eval_type != "categorical":
                chunk["sampling"] = {**sampling, "num_samples": num_samples, "max_batch_size": batch_size}
            chunks.append(chunk)
    log.info(f"chat eval: {sum(len(p) for _, _, p, _ in plan)} problems in {len(chunks)} chunks on {len(pool)} actors")
    answers = pool.map("run", chunks)
    results, position = {}, 0
    for name, eval_type, problems, skipped in plan:
        graded = []
        while position < len(chunks) and chunks[position]["task"] == name:
            graded.extend(answers[position])
            position += 1
        assert len(graded) == len(problems), f"{name}: {len(graded)} of {len(problems)} problems graded"
        results[name] = summarize_task(name, eval_type, problems, graded, num_samples, skipped)
    centered = [r["centered"] for r in results.values()]
    return {"tasks": results, "chatcore": sum(centered) / len(centered),
            "partial": sorted(set(TASK_NAMES) - set(results))}


CSV_COLUMNS = ["task", "eval_type", "num_problems", "num_samples", "accuracy", "baseline", "centered"]


def write_results(results: dict, source: str) -> tuple:
    """report/chat_eval_{source}.csv (one row per task, pass@k columns) and .json, each atomically."""
    max_k = max(len(r["pass_at_k"]) for r in results["tasks"].values())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + [f"pass@{k}" for k in range(1, max_k + 1)])
    for r in results["tasks"].values():
        writer.writerow([r["task"], r["eval_type"], r["num_problems"], r["num_samples"], f"{r['accuracy']:.6f}",
                         f"{r['baseline']:.6f}", f"{r['centered']:.6f}"]
                        + [f"{r['pass_at_k'][str(k)]:.6f}" if str(k) in r["pass_at_k"] else ""
                           for k in range(1, max_k + 1)])
    directory = report_dir()
    csv_path, json_path = directory / f"chat_eval_{source}.csv", directory / f"chat_eval_{source}.json"
    atomic_write(csv_path, buffer.getvalue())
    atomic_write(json_path, json.dumps(results, indent=2) + "\n")
    return csv_path, json_path


def format_table(results: dict) -> str:
    lines = [f"{'task':14s} {'type':11s} {'n':>5s} {'samples':>7s} {'acc':>7s} {'baseline':>8s} {'centered':>9s}  pass@k"]
    for r in results["tasks"].values():
        passes = " ".join(f"{k}:{v:.3f}" for k, v in r["pass_at_k"].items()) if r["eval_type"] != "categorical" else ""
        skipped = f"  ({r['skipped']} too long, skipped)" if r["skipped"] else ""
        lines.append(f"{r['task']:14s} {r['eval_type']:11s} {r['num_problems']:5d} {r['num_samples']:7d} "
                     f"{r['accuracy']:7.4f} {r['baseline']:8.4f} {r['centered']:9.4f}  {passes}{skipped}")
    partial = f"  (partial: without {', '.join(results['partial'])})" if results["partial"] else ""
    lines.append(f"ChatCORE {results['chatcore']:.4f}{partial}")
    return "\n".join(lines)


def main(cfg, args) -> int:
    from raychat.checkpoint import load_stage_model
    from raychat.eval.core import model_max_seq_len

    started = time.time()
    task_names = parse_tasks(args.tasks if args.tasks is not None else cfg.eval.chat_tasks)
    max_problems = cfg.eval.max_problems if args.max_problems is None else args.max_problems
    num_samples = cfg.eval.num_samples if args.num_samples is None else args.num_samples
    if max_problems == 0 or max_problems < -1:
        raise UserError(f"--max-problems must be -1 (all) or >= 1, got {max_problems}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if num_samples > 1 and cfg.eval.temperature == 0:
        raise UserError(f"--num-samples {num_samples} with eval.temperature=0 samples the same reply {num_samples} "
                        f"times: pass --set eval.temperature=1.0 (or 0.6)")
    model, tokenizer, meta = load_stage_model(args.source, cfg.run.name, args.step, storage_path=cfg.run.storage_path)
    context = model_max_seq_len(model) or model.config.sequence_len
    sampling = {"max_tokens": cfg.eval.max_new_tokens, "temperature": cfg.eval.temperature,
                "top_k": cfg.eval.top_k or None, "seed": cfg.eval.seed}
    log.info(f"chat eval of {args.source}/{cfg.run.name} step {meta.get('step')}: {', '.join(task_names)}")

    init_ray()
    with ModelPool(ChatEvalWorker, model, tokenizer, cfg.eval.num_actors, cfg.eval.use_gpu) as pool:
        results = evaluate_chat(pool, tokenizer, task_names, max_problems, num_samples, sampling,
                                cfg.eval.batch_size, max_prompt_tokens=context - 1)
    results.update({"source": args.source, "run": cfg.run.name, "step": meta.get("step"), "preset": cfg.preset,
                    "max_problems": max_problems, "sampling": sampling, "num_actors": cfg.eval.num_actors,
                    "seconds": round(time.time() - started, 1)})
    csv_path, json_path = write_results(results, args.source)
    print(format_table(results))
    print(f"wrote {csv_path} and {json_path} in {results['seconds']:.0f}s")
    return 0
