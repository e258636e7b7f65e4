"""The pretraining stage on a real local Ray with 2 DeepSpeed workers (gloo, fp32, CPU).

One uninterrupted run and one run whose last worker is SIGKILLed mid-run prove, together:
optimizer parity with the single-process reference, lower validation bpb, and exact automatic resume.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from raychat.common import UserError
from raychat.config import load_config
from raychat.train.base import plan_horizon

STEPS, SAVE_EVERY, KILL_AT = 12, 3, 7
OVERRIDES = [
    "pretrain.depth=2", "pretrain.sequence_len=64", "pretrain.max_seq_len=64", "pretrain.device_batch_size=4",
    "pretrain.total_batch_size=1024", f"pretrain.num_iterations={STEPS}", f"pretrain.save_every={SAVE_EVERY}",
    f"pretrain.eval_every={STEPS}", "pretrain.eval_tokens=2048", "pretrain.log_every=3", "pretrain.max_failures=2",
    "pretrain.warmup_ratio=0.25", "pretrain.warmdown_ratio=0.5",   # the LR changes during the compared steps
    "run.keep_checkpoints=0",   # keep every checkpoint: the tests below compare against the early ones
    "pretrain.muon_dtype=fp32",  # equality with the single-process reference is tested in fp32
]


def test_horizon_from_batch_and_ratio():
    cfg = load_config("d20")
    h = plan_horizon(cfg.pretrain, 8, num_params=560_988_160, ratio=20)
    assert h.grad_accum_steps == 524_288 // (32 * 2048 * 8) == 1
    assert h.num_iterations == round(20 * 560_988_160 / 524_288) == 21400
    assert plan_horizon(cfg.pretrain, 4, 560_988_160, 20).grad_accum_steps == 2
    cfg = load_config("d20", ["pretrain.total_batch_size=500000"])
    with pytest.raises(UserError, match="total_batch_size .* must be a multiple of device_batch_size x sequence_len"):
        plan_horizon(cfg.pretrain, 8, 560_988_160, 20)


@pytest.fixture(scope="module")
def runs(ray_cluster, tokenizer, tmp_path_factory, monkeypatch_module):
    """Run the stage twice through Ray Train: uninterrupted, and with rank 1 killed at step 7."""
    from raychat.train.ray_trainer import fit
    base = tmp_path_factory.mktemp("train_base")
    monkeypatch_module.setenv("RAYCHAT_BASE_DIR", str(base))
    tokenizer.save(base / "tokenizer")
    out = {}
    for name, extra in (("clean", []), ("killed", [f"run.kill_worker_at_step={KILL_AT}"])):
        cfg = load_config("demo", OVERRIDES + [f"run.name={name}"] + extra)
        result = fit(cfg, stage="base")
        assert result.error is None
        out[name] = (cfg, base / "checkpoints" / "base" / name, result)
    return out


def test_run_reports_final_metrics_and_checkpoint(runs):
    cfg, root, result = runs["clean"]
    assert result.metrics["step"] == STEPS
    assert result.checkpoint is not None and result.checkpoint.path.endswith(f"step_{STEPS:06d}")
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert steps == [f"step_{s:06d}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    meta = json.loads((root / f"step_{STEPS:06d}" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["config"]["run"]["name"] == "clean"


def test_validation_bpb_goes_down(runs, tokenizer):
    from raychat.data.pretrain import PretrainStream
    from raychat.eval.bpb import evaluate_bpb, limit_tokens
    from raychat.model import GPTConfig, build_model
    cfg, root, result = runs["clean"]
    torch.manual_seed(cfg.run.seed)
    initial = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64))
    trained = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64), init=False)
    trained.load_state_dict(load_file(str(root / f"step_{STEPS:06d}" / "model.safetensors")))
    val = list(limit_tokens(PretrainStream(cfg, tokenizer, "val", 4, 64, use_ray=False), 2048))
    before, after = (evaluate_bpb(m, val, tokenizer.token_bytes) for m in (initial, trained))
    assert after < before - 0.1, (before, after)
    assert result.metrics["val_bpb"] < before


def test_deepspeed_matches_single_process_reference(runs, tokenizer):
    """3 steps on 2 DeepSpeed workers (2 accumulated micro-batches each, warming-up LR) == 3 steps of the
    single-process optimizer (the same AdamW + Muon) given the same mean gradient, in fp32.

    The reference adds the per-rank, per-micro-batch gradients in the order the distributed run does (ZeRO-2
    reduces the AdamW gradients at every micro-batch; Muon's are accumulated locally, then averaged), so fp32
    rounding is the same: with another summation order, Adam's eps=1e-10 turns rounding into ~1e-4
    differences on embedding rows whose gradient is near zero, which says nothing about parity."""
    from raychat.data.pretrain import PretrainStream
    from raychat.model import GPTConfig, build_model
    from raychat.optim import muon_momentum
    from raychat.train.backend import TorchBackend
    from raychat.train.step import Schedule
    cfg, root, _ = runs["clean"]
    torch.manual_seed(cfg.run.seed)
    model = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64))
    streams = [iter(PretrainStream(cfg, tokenizer, "train", 4, 64, rank=r, world_size=2, use_ray=False)) for r in (0, 1)]
    backend = TorchBackend(model, cfg.pretrain, "cpu", "fp32")   # world size 1: plain AdamW + Muon
    schedule = Schedule(STEPS, cfg.pretrain.warmup_ratio, cfg.pretrain.warmdown_ratio, cfg.pretrain.final_lr_frac)
    params = list(model.parameters())
    adamw = {id(p) for group in backend.adamw.param_groups for p in group["params"]}
    lr_mults = set()
    for step in range(SAVE_EVERY):
        backend.set_hyperparameters(schedule.lr_mult(step), muon_momentum(step))
        lr_mults.add(schedule.lr_mult(step))
        g = [[None, None], [None, None]]   # g[rank][micro-batch]: gradients of loss / grad_accum_steps
        for rank, stream in enumerate(streams):
            for micro in range(2):
                inputs, targets = next(stream)
                (model(inputs, targets) / 2).backward()
                g[rank][micro] = [p.grad.clone() for p in params]
                model.zero_grad(set_to_none=True)
        for i, p in enumerate(params):
            if id(p) in adamw:   # DeepSpeed ZeRO-2: mean over ranks at every micro-batch, then accumulated
                p.grad = (g[0][0][i] + g[1][0][i]) / 2 + (g[0][1][i] + g[1][1][i]) / 2
            else:                # Muon: accumulated on each rank, then the mean over ranks
                p.grad = ((g[0][0][i] + g[0][1][i]) + (g[1][0][i] + g[1][1][i])) / 2
        backend.adamw.step()
        backend.muon.step()
        model.zero_grad(set_to_none=True)
    assert len(lr_mults) == SAVE_EVERY   # the learning rate changed at every compared step
    distributed = load_file(str(root / f"step_{SAVE_EVERY:06d}" / "model.safetensors"))
    torch.manual_seed(cfg.run.seed)
    initial = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64))
    for name, ref in model.state_dict().items():
        rel = (distributed[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
        assert not torch.equal(ref, initial.state_dict()[name]) or name == "transformer.wte.weight"


def test_killed_worker_restarts_and_ends_exactly_like_the_clean_run(runs):
    _, clean, _ = runs["clean"]
    _, killed, result = runs["killed"]
    assert (killed / ".fault_injected").read_text() == str(KILL_AT)   # the worker really was killed
    assert result.metrics["step"] == STEPS
    final = f"step_{STEPS:06d}"
    a, b = load_file(str(clean / final / "model.safetensors")), load_file(str(killed / final / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for rank in (0, 1):
        ca = torch.load(clean / final / f"trainer_rank{rank:03d}.pt", weights_only=False)["cursor"]
        cb = torch.load(killed / final / f"trainer_rank{rank:03d}.pt", weights_only=False)["cursor"]
        assert ca == cb


def test_truncated_checkpoint_is_skipped_for_the_previous_one(runs, tmp_path):
    from raychat.train.checkpointing import latest_training_checkpoint
    _, clean, _ = runs["clean"]
    copy = tmp_path / "run"
    shutil.copytree(clean, copy)
    weights = copy / f"step_{STEPS:06d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert latest_training_checkpoint(copy) == copy / f"step_{STEPS - SAVE_EVERY:06d}"
    # a directory still being written (no meta.json yet) is never picked
    (copy / f".step_{STEPS + 3:06d}.tmp").mkdir()
    assert latest_training_checkpoint(copy) == copy / f"step_{STEPS - SAVE_EVERY:06d}"


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(runs, tokenizer):
    from raychat.model import GPTConfig
    from raychat.train.checkpointing import check_resumable
    _, clean, _ = runs["clean"]
    path = clean / f"step_{STEPS:06d}"
    config = GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64)
    check_resumable(path, config, tokenizer, 2, "deepspeed")
    with pytest.raises(UserError, match="the number of workers changed"):
        check_resumable(path, config, tokenizer, 4, "deepspeed")
    with pytest.raises(UserError, match="the model shape"):
        check_resumable(path, GPTConfig(depth=3, vocab_size=tokenizer.get_vocab_size(), sequence_len=64),
                        tokenizer, 2, "deepspeed")
    with pytest.raises(UserError, match="the trainer"):
        check_resumable(path, config, tokenizer, 2, "torch")


def test_submitting_the_same_run_again_continues_from_its_last_checkpoint(runs):
    """Last in this module: it extends the clean run by 3 steps."""
    from raychat.train.ray_trainer import fit
    cfg, root, _ = runs["clean"]
    before = (root / f"step_{STEPS:06d}" / "meta.json").read_bytes()
    longer = load_config("demo", OVERRIDES + ["run.name=clean", f"pretrain.num_iterations={STEPS + 3}"])
    result = fit(longer, stage="base")
    assert result.error is None and result.metrics["step"] == STEPS + 3
    assert (root / f"step_{STEPS + 3:06d}" / "meta.json").exists()
    assert (root / f"step_{STEPS:06d}" / "meta.json").read_bytes() == before   # continued, not redone
    again = fit(longer, stage="base")   # already complete: returns its final checkpoint at once
    assert again.metrics["step"] == STEPS + 3 and again.checkpoint.path.endswith(f"step_{STEPS + 3:06d}")


def test_worker_failures_become_one_line():
    from ray.train import WorkerGroupError

    from raychat.train.launch import failure_summary
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = UserError("checkpoint x cannot be resumed: the tokenizer changed")
    assert failure_summary(WorkerGroupError("...", {1: wrapped})) == \
        "rank 1: checkpoint x cannot be resumed: the tokenizer changed"
    crash = RuntimeError("Traceback (most recent call last):\n  File ...\nValueError: boom\n")
    assert failure_summary(WorkerGroupError("...", {0: crash})) == "rank 0: ValueError: boom"


def test_train_base_user_mistakes_are_one_line(tmp_path, tokenizer):
    import subprocess
    import sys
    env = {**__import__("os").environ, "RAYCHAT_BASE_DIR": str(tmp_path)}

    def train(*args):
        out = subprocess.run([sys.executable, "-m", "raychat.cli", "train", "base", *args], env=env,
                             capture_output=True, text=True, timeout=300)
        return out.returncode, out.stderr.strip().splitlines()

    code, lines = train("--preset", "demo")
    assert code == 2 and lines[-1].startswith("raychat: error: no tokenizer at") and "Traceback" not in "".join(lines)
    tokenizer.save(tmp_path / "tokenizer")
    code, lines = train("--preset", "demo", "--set", "pretrain.total_batch_size=1000")
    assert code == 2 and "must be a multiple of device_batch_size x sequence_len" in lines[-1]
    code, lines = train("--preset", "d20", "--set", "pretrain.depth=2", "--set", "pretrain.max_seq_len=256",
                        "--set", "pretrain.sequence_len=256", "--set", "pretrain.device_batch_size=8",
                        "--set", "pretrain.total_batch_size=16384")
    assert code == 2 and "pretrain needs 8 GPU workers but this machine has 0 GPU(s)" in lines[-1], lines
