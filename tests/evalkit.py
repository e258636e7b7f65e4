"""Helpers for the evaluation tests: a tiny GPT with random (not zero-initialised) weights, and a small
CORE bundle in a temp dir built from the offline files."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from raychat.model import GPTConfig, build_model


def tiny_gpt(vocab_size: int, seed: int = 0, sequence_len: int = 256):
    """A depth-1 GPT whose every weight is random: nanochat's init zeroes lm_head, which would make all
    logits equal and every comparison a tie."""
    model = build_model(GPTConfig(depth=1, vocab_size=vocab_size, sequence_len=sequence_len))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


CORE_YAML = """icl_tasks:
-
  label: copa
  dataset_uri: commonsense_reasoning/copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
-
  label: arc_easy
  dataset_uri: world_knowledge/arc_easy.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: winograd
  dataset_uri: language_understanding/winograd_wsc.jsonl
  num_fewshot: [0]
  icl_task_type: schema
-
  label: hellaswag
  dataset_uri: language_understanding/hellaswag.jsonl
  num_fewshot: [10]
  icl_task_type: multiple_choice
-
  label: bigbench_operators
  dataset_uri: symbolic_problem_solving/bigbench_operators.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
"""

SMALL_TASK_FILES = ["commonsense_reasoning/copa.jsonl", "world_knowledge/arc_easy.jsonl",
                    "language_understanding/winograd_wsc.jsonl", "symbolic_problem_solving/bigbench_operators.jsonl"]


def small_bundle(data_dir: Path, dest: Path, gzipped: bool = True, rows: int = 40) -> Path:
    """A 5-task bundle (MC zero-shot, MC few-shot, schema, a missing task, LM few-shot) with the first
    `rows` rows of each offline file; plain .jsonl like the real zip when not `gzipped`."""
    source = data_dir / "core_eval"
    dest.mkdir(parents=True)
    (dest / "core.yaml").write_text(CORE_YAML)
    shutil.copy(source / "eval_meta_data.csv", dest / "eval_meta_data.csv")
    for uri in SMALL_TASK_FILES:
        with gzip.open(source / "eval_data" / f"{uri}.gz", "rt", encoding="utf-8") as f:
            text = "".join(f.readlines()[:rows])
        target = dest / "eval_data" / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        if gzipped:
            with gzip.open(target.with_name(target.name + ".gz"), "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            target.write_text(text, encoding="utf-8")
    return dest
