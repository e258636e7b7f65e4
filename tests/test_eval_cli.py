"""`raychat eval base` end to end on a local Ray: a saved checkpoint is evaluated on 2 actors; the files
in report/ hold the same bpb and CORE as the in-process functions, and the missing tasks are named."""
from __future__ import annotations

import csv
import json
import math

import pytest

from evalkit import tiny_gpt
from raychat.checkpoint import save_model
from raychat.cli import main as cli_main
from raychat.common import checkpoint_dir, report_dir, tokenizer_dir
from raychat.config import load_config
from raychat.data.pretrain import PretrainStream
from raychat.eval import evaluate_bpb, evaluate_core, limit_tokens

RUN = "evalcli"
ARGS = ["eval", "base", "--preset", "demo", "--set", f"run.name={RUN}", "--set", "eval.core_max_per_task=3",
        "--set", "eval.bpb_tokens=4096"]


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory, ray_cluster):
    """A random depth-1 model saved as base/evalcli step 7, with the tokenizer in place, in a fresh base dir."""
    base = tmp_path_factory.mktemp("evalbase")
    patch = pytest.MonkeyPatch()
    patch.setenv("RAYCHAT_BASE_DIR", str(base))
    model = tiny_gpt(tokenizer.get_vocab_size(), seed=5, sequence_len=256)
    tokenizer.save(tokenizer_dir())
    save_model(checkpoint_dir("base", RUN) / "step_000007", model,
               {"step": 7, "tokenizer_fingerprint": tokenizer.fingerprint()})
    yield model
    patch.undo()


def test_eval_base_writes_the_report_and_matches_in_process(checkpoint, tokenizer, capsys):
    model = checkpoint
    assert cli_main(ARGS) == 0
    out = capsys.readouterr().out
    results = json.loads((report_dir() / "base_eval.json").read_text())
    cfg = load_config("demo", ["eval.core_max_per_task=3", "eval.bpb_tokens=4096"])

    with PretrainStream(cfg, tokenizer, "val", cfg.eval.batch_size, 256, use_ray=False) as stream:
        expected_bpb = evaluate_bpb(model, limit_tokens(stream, 4096), tokenizer.token_bytes)
    assert results["step"] == 7 and results["val_tokens"] >= 4096
    assert results["val_bpb"] == pytest.approx(expected_bpb, rel=1e-5) and math.isfinite(expected_bpb)

    expected_core = evaluate_core(model, tokenizer, cfg, max_per_task=3, device="cpu")
    assert results["core"] == expected_core
    assert sorted(results["core"]["missing_tasks"]) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]

    with open(report_dir() / "base_eval_core.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["task"] for r in rows} == set(expected_core["tasks"])
    assert all(int(r["num_examples"]) == 3 for r in rows)
    assert "missing (no data file in the bundle): hellaswag_zeroshot, hellaswag, squad, coqa" in out
    assert "partial: mean over the 18 of 22 tasks present" in out
    assert f"val bpb {expected_bpb:.4f}" in out


def test_eval_base_user_errors_are_one_line(checkpoint, capsys):
    assert cli_main(ARGS + ["--step", "99"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli_main(ARGS + ["--set", "eval.use_gpu=true"]) == 2
    assert "has no GPU" in capsys.readouterr().err
