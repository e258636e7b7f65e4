"""CORE: DCLM's 22 in-context learning tasks, the base-model score nanochat reports.

The eval bundle (nanochat's `eval_bundle.zip`) holds `core.yaml` (task list: label, data file, task
type, number of few-shot examples, continuation delimiter), `eval_meta_data.csv` (random-guess baseline
per task, in percent) and `eval_data/<dataset_uri>` (JSON lines). Three task types:

- multiple_choice `{"query", "choices", "gold"}`: one prompt per choice, "{query}{delim}{choice}";
  the answer is the choice whose tokens get the lowest mean loss.
- schema `{"context_options", "continuation", "gold"}`: one prompt per context, "{context}{delim}
  {continuation}"; the answer is the context under which the shared continuation has the lowest mean loss.
- language_modeling `{"context", "continuation"}`: correct when greedy decoding reproduces every
  continuation token exactly (one forward pass: the argmax at each continuation position).

Each item gets `num_fewshot` solved examples of the same task in front, drawn from the other items with
a seed fixed per item, joined by blank lines. Accuracy is centered on the random baseline,
(acc - b) / (1 - b), so guessing scores 0 and perfect scores 1; CORE is the mean over the tasks.
"""
from __future__ import annotations

import csv
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from raychat.common import UserError, get_base_dir, get_data_dir, get_logger
from raychat.model import autocast_context

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "   # tasks without continuation_delimiter in core.yaml (as in nanochat)
SHUFFLE_SEED = 1337       # which items a capped task keeps
FEWSHOT_SEED = 1234       # + item index: which few-shot examples each item gets

log = get_logger()


# ---------------------------------------------------------------------------------------- the bundle

def locate_bundle(cfg) -> Path:
    """The eval bundle directory: RAYCHAT_DATA_DIR/core_eval when offline data is configured, otherwise
    RAYCHAT_BASE_DIR/eval_bundle, downloaded from `cfg.eval.bundle_url` the first time."""
    offline = get_data_dir("core_eval")
    if offline is not None:
        return offline
    dest = get_base_dir() / "eval_bundle"
    if (dest / "core.yaml").is_file():
        return dest
    return download_bundle(cfg.eval.bundle_url, dest, sha256=cfg.eval.bundle_sha256)


def download_bundle(url: str, dest: Path, sha256: str = "", retries: int = 3) -> Path:
    """Download the bundle zip to `<dest>.zip.part` (resuming a partial one when the server allows),
    check it (sha256 when given, the zip's CRCs, the files CORE needs), extract it into a temp dir next
    to `dest` and rename that into place, so `dest` is either complete or absent."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f"{dest.name}.zip.part"
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be downloading the same bundle
        if (dest / "core.yaml").is_file():
            return dest
        for attempt in range(1, retries + 1):
            try:
                _fetch(url, part)
                break
            except (OSError, _HTTPError) as error:
                if attempt == retries or not getattr(error, "retry", True):
                    raise UserError(f"could not download the CORE eval bundle from {url}: {error}") from None
                log.warning(f"eval bundle download failed ({error}); retry {attempt}/{retries - 1}")
                time.sleep(2 ** attempt)
        try:
            _verify_and_extract(part, dest, url, sha256)
        finally:
            part.unlink(missing_ok=True)  # verified and extracted, or bad: either way not reused
    log.info(f"CORE eval bundle ready at {dest}")
    return dest


class _HTTPError(Exception):
    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry  # False for answers that will not change (404, 403, ...)


def _fetch(url: str, part: Path) -> None:
    import requests
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = requests.get(url, stream=True, timeout=60, headers=headers)
    except requests.RequestException as error:
        raise _HTTPError(str(error)) from None
    with response:
        if have and response.status_code == 416:  # the partial file is already complete
            return
        if response.status_code not in (200, 206):
            code = response.status_code
            raise _HTTPError(f"HTTP {code}", retry=code >= 500 or code in (408, 429))
        if response.status_code == 200:
            have = 0  # the server ignored the range: start again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else 0  # 0 = size unknown
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total or None, initial=have, unit="B", unit_scale=True, desc="eval_bundle.zip") as bar:
            try:
                for chunk in response.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses little
                    f.write(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as error:
                raise _HTTPError(f"connection lost: {error}") from None
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total and size != total:
        raise _HTTPError(f"incomplete download: {size} of {total} bytes")


def _verify_and_extract(part: Path, dest: Path, url: str, sha256: str) -> None:
    if sha256:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise UserError(f"the eval bundle from {url} has sha256 {digest.hexdigest()}, expected {sha256}")
    try:
        with zipfile.ZipFile(part) as archive:
            try:
                broken = archive.testzip()
            except (zlib.error, EOFError, OSError) as error:  # a damaged deflate stream
                broken = f"{error}"
            if broken is not None:
                raise UserError(f"the eval bundle from {url} is corrupt ({broken})")
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                archive.extractall(tmp)
                root = _bundle_root(tmp)
                if root is None:
                    raise UserError(f"the eval bundle from {url} has no core.yaml, eval_meta_data.csv "
                                    "and eval_data/")
                if dest.exists():
                    shutil.rmtree(dest)  # an incomplete leftover (it has no core.yaml)
                os.rename(root, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as error:
        raise UserError(f"the eval bundle from {url} is not a valid zip file ({error})") from None


def _bundle_root(tmp: Path) -> Path | None:
    """The extracted directory holding core.yaml: the zip's top folder (eval_bundle/) or the zip root."""
    for candidate in [tmp, *sorted(p for p in tmp.iterdir() if p.is_dir())]:
        if ((candidate / "core.yaml").is_file() and (candidate / "eval_meta_data.csv").is_file()
                and (candidate / "eval_data").is_dir()):
            return candidate
    return None


# ---------------------------------------------------------------------------------------- the tasks

@dataclass(frozen=True)
class CoreTask:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, from eval_meta_data.csv


def load_core_tasks(bundle: Path) -> list[CoreTask]:
    """The task list of core.yaml with each task's random baseline."""
    import yaml

    bundle = Path(bundle)
    try:
        config = yaml.safe_load((bundle / "core.yaml").read_text())
        with open(bundle / "eval_meta_data.csv", newline="") as f:
            baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}
    except (OSError, yaml.YAMLError, KeyError) as error:
        raise UserError(f"cannot read the CORE task list in {bundle}: {error}") from None
    tasks = []
    for entry in (config or {}).get("icl_tasks") or []:
        label = entry.get("label")
        where = f"{bundle / 'core.yaml'}: task {label!r}"
        if entry.get("icl_task_type") not in TASK_TYPES:
            raise UserError(f"{where} has icl_task_type {entry.get('icl_task_type')!r}; expected one of "
                            f"{', '.join(TASK_TYPES)}")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        if label not in baselines:
            raise UserError(f"{where} has no random baseline in {bundle / 'eval_meta_data.csv'}")
        try:
            baseline = float(baselines[label])
        except ValueError:
            raise UserError(f"{where}: random baseline {baselines[label]!r} is not a number") from None
        tasks.append(CoreTask(label=label, dataset_uri=entry["dataset_uri"], task_type=entry["icl_task_type"],
                              num_fewshot=int(shots), delimiter=entry.get("continuation_delimiter", DEFAULT_DELIMITER),
                              random_baseline=baseline))
    if not tasks:
        raise UserError(f"{bundle / 'core.yaml'} lists no icl_tasks")
    return tasks


def task_data_path(bundle: Path, task: CoreTask) -> Path | None:
    """eval_data/<dataset_uri>, or its gzipped copy (the offline folder stores them gzipped)."""
    plain = Path(bundle) / "eval_data" / task.dataset_uri
    for path in (plain, plain.with_name(plain.name + ".gz")):
        if path.is_file():
            return path
    return None


def load_task_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows, number = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} (line {number}): {error}") from None
    return rows


# ------------------------------------------------------------------------------------ prompt rendering

def sample_fewshot(num_rows: int, index: int, k: int) -> list[int]:
    """k distinct row indices other than `index`, the same ones every run (seeded by the item index)."""
    k = min(k, num_rows - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + index).sample(range(num_rows - 1), k)
    return [j + 1 if j >= index else j for j in picks]  # skip the item itself


def render_item(task: CoreTask, row: dict, fewshot: list[dict]) -> dict:
    """The prompts one item is scored on: {"task_type", "prompts", "gold"}.

    multiple_choice / schema: one full prompt per option, gold = index of the right one.
    language_modeling: [context only (trailing whitespace stripped), context + continuation], gold = None.
    """
    d = task.delimiter
    try:
        if task.task_type == "multiple_choice":
            shots = [f"{ex['query']}{d}{ex['choices'][ex['gold']]}" for ex in fewshot]
            prefix = "".join(s + "\n\n" for s in shots)
            prompts = [f"{prefix}{row['query']}{d}{choice}" for choice in row["choices"]]
            gold = int(row["gold"])
        elif task.task_type == "schema":
            shots = [f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}" for ex in fewshot]
            prefix = "".join(s + "\n\n" for s in shots)
            prompts = [f"{prefix}{context}{d}{row['continuation']}" for context in row["context_options"]]
            gold = int(row["gold"])
        else:
            shots = [f"{ex['context']}{d}{ex['continuation']}" for ex in fewshot]
            prefix = "".join(s + "\n\n" for s in shots)
            # Trailing whitespace of the context would merge into the continuation's first token, and the
            # context tokens would no longer be a prefix of the full prompt's tokens.
            prompts = [f"{prefix}{row['context']}{d}".rstrip(), f"{prefix}{row['context']}{d}{row['continuation']}"]
            gold = None
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise UserError(f"CORE task {task.label}: malformed row ({type(error).__name__}: {error}): "
                        f"{json.dumps(row)[:200]}") from None
    if gold is not None and not 0 <= gold < len(prompts):
        raise UserError(f"CORE task {task.label}: gold {gold} out of range for {len(prompts)} options")
    return {"task_type": task.task_type, "prompts": prompts, "gold": gold}


def prepare_task_items(task: CoreTask, rows: list[dict], max_per_task: int = -1) -> list[dict]:
    """The items evaluated for a task: a fixed shuffle, capped at `max_per_task` (-1 = all), rendered with
    few-shot examples drawn from all the task's other rows."""
    if max_per_task == 0 or max_per_task < -1:
        raise UserError(f"max examples per CORE task must be -1 (all) or >= 1, got {max_per_task}")
    order = list(range(len(rows)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    if max_per_task > 0:
        order = order[:max_per_task]
    return [render_item(task, rows[i], [rows[j] for j in sample_fewshot(len(rows), i, task.num_fewshot)])
            for i in order]


# ----------------------------------------------------------------------------------------- scoring

def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def _common_suffix_len(seqs: list[list[int]]) -> int:
    return _common_prefix_len([s[::-1] for s in seqs])


def item_token_spans(item: dict, token_lists: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The token rows to run and, per row, the [start, end) positions of the tokens being scored.

    multiple_choice: the options share the prompt, so the scored part starts where their tokens diverge.
    schema: the options share the continuation, so it is their common token suffix.
    language_modeling: the tokens after the context-only prompt.
    Every span keeps at least one token and starts after the BOS (position 0 predicts nothing).
    """
    kind = item["task_type"]
    if kind == "multiple_choice":
        start = min(_common_prefix_len(token_lists), min(map(len, token_lists)) - 1)
        return token_lists, [(max(start, 1), len(t)) for t in token_lists]
    if kind == "schema":
        suffix = min(_common_suffix_len(token_lists), min(map(len, token_lists)) - 1)
        return token_lists, [(len(t) - max(suffix, 1), len(t)) for t in token_lists]
    context, full = token_lists
    start = len(context) if full[:len(context)] == context else _common_prefix_len([context, full])
    return [full], [(max(1, min(start, len(full) - 1)), len(full))]


def _crop_left(rows: list[list[int]], spans: list[tuple[int, int]], max_len: int | None):
    """Keep the last `max_len` tokens of long rows (the scored tokens are at the end)."""
    if not max_len:
        return rows, spans
    out_rows, out_spans = [], []
    for row, (start, end) in zip(rows, spans):
        cut = max(0, len(row) - max_len)
        out_rows.append(row[cut:])
        out_spans.append((max(1, start - cut), end - cut))
    return out_rows, out_spans


@torch.no_grad()
def score_item(model, tokenizer, item: dict, device, max_seq_len: int | None = None) -> bool:
    """Whether the model answers one rendered item correctly (see the module docstring)."""
    bos = tokenizer.get_bos_token_id()
    token_lists = tokenizer.encode(item["prompts"], prepend=bos)
    rows, spans = item_token_spans(item, token_lists)
    rows, spans = _crop_left(rows, spans, max_seq_len)
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width), bos, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, :len(row)] = torch.tensor(row, dtype=torch.long)  # padding after a row cannot affect it (causal)
    inputs = inputs.to(device)
    logits = model(inputs)
    if item["task_type"] == "language_modeling":
        start, end = spans[0]
        predicted = logits[0, start - 1:end - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, inputs[0, start:end]))
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), inputs[:, 1:], reduction="none")
    mean_losses = torch.stack([losses[i, start - 1:end - 1].mean() for i, (start, end) in enumerate(spans)])
    return int(mean_losses.argmin()) == item["gold"]


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 for random guessing, 1 for a perfect score: (acc - b) / (1 - b), b = baseline / 100."""
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def task_result(task: CoreTask, correct: list[bool]) -> dict:
    accuracy = sum(correct) / len(correct) if correct else 0.0
    return {"task_type": task.task_type, "num_fewshot": task.num_fewshot, "num_examples": len(correct),
            "random_baseline": task.random_baseline, "accuracy": accuracy,
            "centered": centered_accuracy(accuracy, task.random_baseline)}


def summarize(results: dict[str, dict], missing: list[CoreTask]) -> dict:
    """CORE = mean centered accuracy over the tasks that were evaluated; missing ones are listed."""
    if not results:
        raise UserError("no CORE task could be evaluated: every task's data file is missing")
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "num_tasks": len(results), "num_tasks_total": len(results) + len(missing),
            "partial": bool(missing), "missing_tasks": [t.label for t in missing], "tasks": results}


def present_and_missing(bundle: Path) -> tuple[list[tuple[CoreTask, Path]], list[CoreTask]]:
    present, missing = [], []
    for task in load_core_tasks(bundle):
        path = task_data_path(bundle, task)
        if path is None:
            missing.append(task)
        else:
            present.append((task, path))
    return present, missing


def prepare_all(bundle: Path, max_per_task: int) -> tuple[list[tuple[CoreTask, list[dict]]], list[CoreTask]]:
    """Every present task with its rendered items, and the tasks whose data is missing."""
    present, missing = present_and_missing(bundle)
    return [(task, prepare_task_items(task, load_task_rows(path), max_per_task)) for task, path in present], missing


def model_max_seq_len(model) -> int | None:
    return getattr(getattr(model, "config", None), "sequence_len", None)


def evaluate_core(model, tokenizer, cfg, max_per_task: int = -1, device=None, bundle: Path | None = None) -> dict:
    """CORE of `model` in this process (the trainer's rank 0): {"core", "tasks": {label: {...}},
    "missing_tasks", "num_tasks", "num_tasks_total", "partial"}."""
    bundle = Path(bundle) if bundle is not None else locate_bundle(cfg)
    device = device if device is not None else next(model.parameters()).device
    prepared, missing = prepare_all(bundle, max_per_task)
    max_len = model_max_seq_len(model)
    was_training = model.training
    model.eval()
    results = {}
    try:
        with autocast_context(device):
            for task, items in prepared:
                correct = [score_item(model, tokenizer, item, device, max_len) for item in items]
                results[task.label] = task_result(task, correct)
    finally:
        model.train(was_training)
    return summarize(results, missing)

