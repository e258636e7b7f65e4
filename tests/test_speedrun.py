"""`raychat speedrun` end to end on a test-size config (every stage, real Ray, real training):

1. the first run dies in pretraining (a worker is killed, no retries): one line names the stage and the
   command that resumes;
2. that command, run as printed, skips the finished stages, resumes pretraining from its checkpoint and runs
   the rest, ending with the report card;
3. a third run skips every stage;
and the report card: every stage in its table, missing ones shown as missing (never zeros), valid PNGs.
"""
import json
import shlex
import struct

import pytest

from raychat.cli import main as cli_main
from raychat.config import load_config
from raychat.pipeline import get_stage, stage_status

SETS = [
    "tokenizer.vocab_size=1024", "tokenizer.max_chars=1000000",
    "pretrain.sequence_len=64", "pretrain.max_seq_len=64", "pretrain.device_batch_size=4",
    "pretrain.total_batch_size=512", "pretrain.num_iterations=6", "pretrain.save_every=2", "pretrain.eval_every=0",
    "pretrain.eval_tokens=1024", "pretrain.log_every=2",
    "midtrain.sequence_len=64", "midtrain.device_batch_size=4", "midtrain.total_batch_size=512",
    "midtrain.mixture=identity:40,spelling:40", "midtrain.num_iterations=3", "midtrain.eval_every=0",
    "midtrain.eval_tokens=512",
    "sft.sequence_len=64", "sft.device_batch_size=2", "sft.total_batch_size=4", "sft.mixture=identity:20,spelling:20",
    "sft.num_iterations=3", "sft.eval_every=0", "sft.eval_tokens=512",
    "eval.core_max_per_task=2", "eval.bpb_tokens=1024", "eval.num_actors=1",
    "eval.chat_tasks=ARC-Easy,GSM8K", "eval.max_problems=2", "eval.max_new_tokens=8",
    "rl.sequence_len=64", "rl.num_iterations=2", "rl.examples_per_step=2", "rl.num_samples=2",
    "rl.device_batch_size=2", "rl.max_new_tokens=8", "rl.eval_problems=2", "rl.eval_samples=1", "rl.save_every=0",
]
# the first run: the last worker kills itself at step 3 (after the step-2 checkpoint) and Ray may not retry
FAULT = ["run.kill_worker_at_step=3", "pretrain.max_failures=0"]
STAGES = ["data", "tokenizer", "base", "base_eval", "mid", "chat_eval_mid", "sft", "chat_eval_sft", "rl",
          "chat_eval_rl"]


def argv(sets: list[str]) -> list[str]:
    return ["speedrun", "--preset", "demo", *(x for s in sets for x in ("--set", s))]


@pytest.fixture(scope="module")
def runs(ray_cluster, data_dir, tmp_path_factory, monkeypatch_module):
    base = tmp_path_factory.mktemp("speedrun") / "raychat"
    monkeypatch_module.setenv("RAYCHAT_BASE_DIR", str(base))
    return base


def test_failed_stage_is_one_line_with_the_resume_command(runs, capsys):
    assert cli_main(argv(SETS + FAULT)) == 2
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert line.startswith("raychat: error: speedrun stopped at stage 'base': base training failed:")
    resume = line.split("resume with: ")[1]
    assert shlex.split(resume) == ["raychat", *argv(SETS + FAULT)]
    assert "[speedrun] tokenizer: done" in out
    assert (runs / "checkpoints" / "base" / "default" / "step_000002").is_dir()
    assert not (runs / "checkpoints" / "base" / "default" / "step_000006").exists()
    runs_state = stage_status(get_stage("base"), load_config("demo", SETS + FAULT))
    assert runs_state.state == "resume" and "interrupted at step 2 of 6" in runs_state.reason


def test_resume_command_skips_done_stages_and_resumes_the_interrupted_one(runs, capsys):
    import time
    started = time.time()
    assert cli_main(argv(SETS + FAULT)) == 0, capsys.readouterr().err[-3000:]   # the command printed above
    out, _ = capsys.readouterr()
    assert "[speedrun] data: skipped, already done" in out
    assert "[speedrun] tokenizer: skipped, already done" in out
    assert "[speedrun] base: interrupted at step 2 of 6: resuming from" in out
    for stage in STAGES[2:]:
        assert f"[speedrun] {stage}: done in" in out
    meta = json.loads((runs / "checkpoints" / "base" / "default" / "step_000006" / "meta.json").read_text())
    assert meta["step"] == meta["num_iterations"] == 6
    # resumed, not restarted: the step-2 checkpoint written before the fault is still the one of the first run
    assert (runs / "checkpoints" / "base" / "default" / ".fault_injected").read_text() == "3"
    assert "report card:" in out and "chat with the model: raychat serve --preset demo" in out
    print(f"resumed speedrun took {time.time() - started:.0f} s")


def test_third_run_skips_every_stage(runs, capsys):
    assert cli_main(argv(SETS)) == 0   # the fault drill's settings do not decide any output
    out, _ = capsys.readouterr()
    for stage in STAGES:
        assert f"[speedrun] {stage}: skipped, already done" in out, out
    assert "running `raychat" not in out


def test_changed_config_is_a_conflict_not_a_silent_continuation(runs):
    status = stage_status(get_stage("base"), load_config("demo", SETS + ["pretrain.matrix_lr=0.03"]))
    assert status.state == "conflict" and "pretrain.matrix_lr 0.02 -> 0.03" in status.reason
    assert "run.name" in status.reason   # names the fix
    # mid continues the current base weights; an SFT from another parent stage is a conflict too
    status = stage_status(get_stage("sft"), load_config("demo", SETS + ["sft.source=base"]))
    assert status.state == "conflict"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image
    from PIL import Image
    with Image.open(path) as image:
        image.verify()
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and width > 100 and height > 100
    assert pixels[..., :3].std() > 0.01   # something is drawn


def test_report_card(runs, capsys):
    report = (runs / "report" / "report.md").read_text()
    summary = report.split("## Summary")[1].split("##")[0]
    base_eval = json.loads((runs / "report" / "base_eval.json").read_text())
    assert f"| CORE | {base_eval['core_metric']:.4f} | - | - | - |" in summary
    # every chat stage was evaluated: its numbers, as chat evaluation wrote them, in its column
    chat = {s: json.loads((runs / "report" / f"chat_eval_{s}.json").read_text()) for s in ("mid", "sft", "rl")}
    arc = " | ".join(f"{chat[s]['tasks']['ARC-Easy']['accuracy']:.4f}" for s in ("mid", "sft", "rl"))
    assert f"| ARC-Easy | - | {arc} |" in summary
    chatcore = " | ".join(f"{chat[s]['chatcore']:.4f}" for s in ("mid", "sft", "rl"))
    assert f"| ChatCORE | - | {chatcore} |" in summary
    assert "| MMLU | - | missing | missing | missing |" in summary   # a task not evaluated is missing, not 0
    for stage in STAGES:
        assert f"| {stage} | " in report   # wall-clock of every stage
    assert "## RL" in report
    pngs = ["base_curves.png", "mid_curves.png", "sft_curves.png", "core_tasks.png"]
    for name in pngs:
        assert f"]({name})" in report
        check_png(runs / "report" / name)

    # without RL's outputs its column and section say missing (never zeros), the others stay
    hidden = [runs / "report" / "chat_eval_rl.json", runs / "report" / "rl_train.json"]
    for path in hidden:
        path.rename(path.with_suffix(".hidden"))
    try:
        assert cli_main(["report", "--preset", "demo", *(x for s in SETS for x in ("--set", s))]) == 0
        out, _ = capsys.readouterr()
        row = next(line.split() for line in out.splitlines() if line.startswith("ARC-Easy"))
        assert row[-1] == "missing" and row[3] == f"{chat['sft']['tasks']['ARC-Easy']['accuracy']:.4f}"
        report = (runs / "report" / "report.md").read_text()
        assert "**missing**: no report/rl_train.json" in report
    finally:
        for path in hidden:
            path.with_suffix(".hidden").rename(path)
