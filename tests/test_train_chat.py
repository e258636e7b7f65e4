"""Mid-training and SFT: horizons, schedules and parent checks in the driver; then each stage on a real
local Ray with 2 DeepSpeed workers (gloo, fp32, CPU), uninterrupted and with a worker SIGKILLed mid-run,
ending bitwise equal."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from raychat.checkpoint import save_model, sha256_file
from raychat.common import UserError
from raychat.config import load_config
from raychat.train.stage import make_stage

STEPS, SAVE_EVERY, KILL_AT = 6, 2, 3
MID = ["midtrain.sequence_len=128", "midtrain.device_batch_size=4", "midtrain.total_batch_size=2048",
       f"midtrain.num_iterations={STEPS}", f"midtrain.save_every={SAVE_EVERY}", f"midtrain.eval_every={STEPS}",
       "midtrain.eval_tokens=512", "midtrain.log_every=2", "midtrain.max_failures=2", "midtrain.warmdown_ratio=0.5",
       "midtrain.mixture=mmlu-aux,identity:2000", "run.keep_checkpoints=0"]   # 10k conversations: lengths in Ray tasks
SFT = ["sft.sequence_len=128", "sft.device_batch_size=2", "sft.total_batch_size=8", f"sft.num_iterations={STEPS}",
       f"sft.save_every={SAVE_EVERY}", f"sft.eval_every={STEPS}", "sft.eval_tokens=256", "sft.log_every=2",
       "sft.max_failures=2", "sft.init_lr_frac=0.5", "sft.mixture=arc-easy:100,gsm8k:40,identity:40",
       "run.keep_checkpoints=0"]


def _save_base(root, tokenizer, run="default", step=5, sequence_len=128, fingerprint=None):
    from raychat.model import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=1, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    path = root / "checkpoints" / "base" / run / f"step_{step:06d}"
    save_model(path, model, {"step": step, "tokenizer_fingerprint": fingerprint or tokenizer.fingerprint()})
    return path


@pytest.fixture
def base_dir(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(tmp_path / "tokenizer")
    _save_base(tmp_path, tokenizer)
    return tmp_path


# ----------------------------------------------------------------------------- the driver, without Ray

def test_mid_horizon_is_one_epoch_of_what_the_workers_pack(base_dir, tokenizer):
    from raychat.data.chat import ConversationStream
    parent = _save_base(base_dir, tokenizer, step=7, sequence_len=256)   # the latest base checkpoint
    cfg = load_config("demo", MID + ["midtrain.num_iterations=-1", "midtrain.sequence_len=256",
                                     "midtrain.mixture=mmlu-aux:300,identity:200,gsm8k:50,smoltalk",
                                     "midtrain.total_batch_size=2048", "midtrain.warmdown_ratio=0.2"])
    stage = make_stage("mid", cfg)
    plan = stage.preflight()
    stage = make_stage("mid", cfg, plan)
    horizon = stage.horizon(2, 0)
    mixture = stage.mixture(cfg.midtrain.mixture)
    rows = [sum(x.size(0) for x, _ in ConversationStream(mixture, tokenizer, "pack", 1, 256, r, 2, loop=False))
            for r in range(2)]
    assert horizon.micro_batch_size * horizon.grad_accum_steps == 4   # rows per step on each worker
    assert plan["epoch_steps"] == horizon.num_iterations == min(rows) // 4 >= 10
    assert plan["dropped"] > 0 and plan["conversations"] == 300 + 200 + 50 + 85
    schedule = stage.schedule(horizon)   # pretraining's LRs, the last 20% decaying to 0 at the epoch's end
    n = horizon.num_iterations
    assert schedule.lr_mult(0) == 1.0 and 0 < schedule.lr_mult(n - 1) < 1 and schedule.lr_mult(n) == 0.0
    assert plan["parent"] == {"stage": "base", "run": "default", "step": 7, "path": str(parent),
                              "weights_sha256": sha256_file(parent / "model.safetensors")}


def test_sft_horizon_counts_conversations_and_lr_starts_at_a_fraction(base_dir):
    cfg = load_config("demo", SFT + ["sft.num_iterations=-1", "sft.mixture=identity:101", "sft.num_epochs=2",
                                     "sft.init_lr_frac=0.02", "sft.source=base"])
    stage = make_stage("sft", cfg)
    plan = stage.preflight()
    assert plan["parent"]["stage"] == "base" and plan["conversations"] == 101
    horizon = make_stage("sft", cfg, plan).horizon(2, 0)
    # 50 conversations per worker per epoch, 4 per worker per step: 2 epochs = 25 steps, 2 micro-batches of 2
    assert (horizon.num_iterations, horizon.grad_accum_steps, horizon.micro_batch_size) == (25, 2, 2)
    schedule = stage.schedule(horizon)
    for step in (0, 5, 24, 25):   # nanochat: lr = 0.02 x base x (1 - step / steps)
        assert schedule.lr_mult(step) == pytest.approx(0.02 * (1 - step / 25))
    with pytest.raises(UserError, match=r"sft.total_batch_size \(6 conversations\) must be a multiple of "
                                        r"sft.device_batch_size x num_workers = 2 x 2 = 4"):
        make_stage("sft", load_config("demo", SFT + ["sft.total_batch_size=6"]), plan).horizon(2, 0)


def test_planned_sft_epochs_do_not_warn_but_repeating_data_does(base_dir):
    """The loop asks the stage what to say when the data wraps: SFT's second planned pass is silent (and
    never mentions pretraining shards), a pass beyond the plan is named."""
    import logging

    from raychat.train.loop import run_stage
    cfg = load_config("demo", SFT + ["sft.source=base", "sft.num_iterations=-1", "sft.num_epochs=2",
                                     "sft.mixture=identity:16", "sft.eval_every=0", "sft.save_every=0",
                                     "sft.total_batch_size=4", "run.name=epochs", "sft.parent_run=default"])
    stage = make_stage("sft", cfg)
    stage = make_stage("sft", cfg, stage.preflight())
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("raychat.train").addHandler(handler)
    try:
        metrics = run_stage(stage, 0, 1, "cpu", use_deepspeed=False)
    finally:
        logging.getLogger("raychat.train").removeHandler(handler)
    assert metrics["step"] == 8 and not [w for w in warnings if "wrapped" in w]   # 16 conversations x 2 / 4
    horizon = stage.horizon(1, 0)
    assert stage.wrap_warning(1, 4, horizon) is None
    assert stage.wrap_warning(2, 8, horizon).startswith("sft.mixture wrapped into pass 3 at step 8 (100% of the run)")
    assert "shards" not in stage.wrap_warning(2, 8, horizon)
    mid = make_stage("mid", load_config("demo", MID), {"num_iterations": 6})
    assert mid.wrap_warning(1, 6, mid.horizon(2, 0)).startswith("midtrain.mixture wrapped into pass 2 at step 6")


def test_parent_mistakes_are_one_line(base_dir, tokenizer):
    cfg = load_config("demo", SFT)   # source=mid, and there is no mid checkpoint
    with pytest.raises(UserError, match=r"sft starts from a mid checkpoint, but there is no complete one in .*"
                                        r"run `raychat train mid` first"):
        make_stage("sft", cfg).preflight()
    with pytest.raises(UserError, match=r"midtrain.sequence_len \(256\) is longer than the base model's "
                                        r"context \(128\)"):
        make_stage("mid", load_config("demo", ["midtrain.sequence_len=256"])).preflight()
    _save_base(base_dir, tokenizer, step=9, fingerprint="f" * 64)   # the latest base: another tokenizer
    with pytest.raises(UserError, match="was trained with tokenizer ffffffffffff, but the current tokenizer"):
        make_stage("mid", load_config("demo", MID)).preflight()


def test_train_mid_without_a_base_checkpoint_is_one_line(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer")
    env = {**os.environ, "RAYCHAT_BASE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "raychat.cli", "train", "mid", "--preset", "demo"], env=env,
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert lines[-1].startswith("raychat: error: mid starts from a base checkpoint, but there is no complete one")


# -------------------------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def runs(ray_cluster, tokenizer, tmp_path_factory, monkeypatch_module):
    """mid from a base checkpoint, then SFT from the clean mid run; each uninterrupted and with rank 1
    SIGKILLed at step 3 (resumed from the step-2 checkpoint)."""
    from raychat.train.ray_trainer import fit
    base = tmp_path_factory.mktemp("train_chat")
    monkeypatch_module.setenv("RAYCHAT_BASE_DIR", str(base))
    tokenizer.save(base / "tokenizer")
    out = {"base": _save_base(base, tokenizer)}
    for stage, overrides, parent in (("mid", MID, ["midtrain.parent_run=default"]),
                                     ("sft", SFT, ["sft.parent_run=midclean"])):
        for kind, extra in (("clean", []), ("killed", [f"run.kill_worker_at_step={KILL_AT}"])):
            cfg = load_config("demo", overrides + parent + [f"run.name={stage}{kind}"] + extra)
            result = fit(cfg, stage=stage)
            assert result.error is None
            out[stage, kind] = (base / "checkpoints" / stage / f"{stage}{kind}", result)
    return out


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_killed_worker_resumes_and_ends_exactly_like_the_clean_run(runs, stage):
    clean, clean_result = runs[stage, "clean"]
    killed, result = runs[stage, "killed"]
    assert (killed / ".fault_injected").read_text() == str(KILL_AT)   # the worker really was killed
    assert result.metrics["step"] == clean_result.metrics["step"] == STEPS and "val_bpb" in result.metrics
    final = f"step_{STEPS:06d}"
    a, b = load_file(str(clean / final / "model.safetensors")), load_file(str(killed / final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    for rank in (0, 1):
        ca = torch.load(clean / final / f"trainer_rank{rank:03d}.pt", weights_only=False)["cursor"]
        cb = torch.load(killed / final / f"trainer_rank{rank:03d}.pt", weights_only=False)["cursor"]
        assert ca == cb and ca["next_seq"] > 0


def test_each_stage_starts_from_its_parent_and_records_it(runs):
    base = runs["base"]
    mid, _ = runs["mid", "clean"]
    for stage, parent_path in (("mid", base), ("sft", mid / f"step_{STEPS:06d}")):
        root, _ = runs[stage, "clean"]
        meta = json.loads((root / f"step_{STEPS:06d}" / "meta.json").read_text())
        assert meta["stage"] == stage and meta["world_size"] == 2 and meta["trainer"] == "deepspeed"
        assert meta["parent"]["path"] == str(parent_path)
        assert meta["parent"]["weights_sha256"] == sha256_file(parent_path / "model.safetensors")
        before, after = load_file(str(parent_path / "model.safetensors")), \
            load_file(str(root / f"step_{STEPS:06d}" / "model.safetensors"))
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    sft_meta = json.loads((runs["sft", "clean"][0] / f"step_{STEPS:06d}" / "meta.json").read_text())
    assert sft_meta["parent"]["stage"] == "mid" and sft_meta["parent"]["run"] == "midclean"
    assert sft_meta["parent"]["step"] == STEPS


def test_mixture_lengths_in_ray_tasks_are_the_driver_s_own(ray_cluster, tokenizer):
    """d20's mixture is rendered in Ray tasks of LENGTH_TASK_SIZE conversations; they must measure exactly
    what the driver (and every worker) renders, in mixture order."""
    from raychat.tasks.mixture import build_mixture
    from raychat.train.mid import LENGTH_TASK_SIZE, mixture_lengths
    spec = "identity:5500,gsm8k:600"
    mixture = build_mixture(spec, seed=11)
    assert len(mixture) > LENGTH_TASK_SIZE   # at least two tasks
    lengths = mixture_lengths(spec, 11, tokenizer, len(mixture))
    assert lengths == [len(tokenizer.render_conversation(mixture[i], max_tokens=2**62)[0]) for i in range(len(mixture))]
