"""The training loop around `train_step`, shared by the Ray trainer and the bare trainer.

Per rank: build the model (same seed everywhere), plan the horizon, resume from the latest complete
checkpoint if there is one (weights, optimizer state, data cursor, RNG, step), then step; evaluate
validation bits-per-byte, sample, log and checkpoint at the configured intervals.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from raychat.common import UserError, checkpoint_dir, get_logger, resolve_dtype, tensorboard_dir
from raychat.train.step import Schedule, train_step

log = get_logger("raychat.train")

# bf16 dense peak FLOP/s per device, for MFU (H100/H200 SXM: 989 TFLOP/s)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


@dataclass
class Horizon:
    num_iterations: int
    grad_accum_steps: int
    tokens_per_step: int


def plan_horizon(train_cfg, world_size: int, num_params: int | None = None, ratio: float | None = None) -> Horizon:
    """Device batch, gradient accumulation and number of steps from the preset; a clear error when
    the total batch is not a whole number of micro-batches."""
    micro_tokens = train_cfg.device_batch_size * train_cfg.sequence_len * world_size
    if train_cfg.total_batch_size % micro_tokens:
        raise UserError(
            f"total_batch_size ({train_cfg.total_batch_size:,} tokens) must be a multiple of device_batch_size x "
            f"sequence_len x num_workers = {train_cfg.device_batch_size} x {train_cfg.sequence_len} x {world_size} "
            f"= {micro_tokens:,}")
    grad_accum = train_cfg.total_batch_size // micro_tokens
    if train_cfg.num_iterations > 0:
        iterations = train_cfg.num_iterations
    elif num_params and ratio:
        iterations = max(1, round(ratio * num_params / train_cfg.total_batch_size))
    else:
        raise UserError("set num_iterations or a tokens-per-parameter ratio: the horizon is undefined")
    return Horizon(iterations, grad_accum, train_cfg.total_batch_size)


def device_peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _maybe_inject_fault(cfg, root: Path, step: int, rank: int, world: int) -> None:
    """Chaos testing (run.kill_worker_at_step): the last rank SIGKILLs its own process once, at that step."""
    if cfg.run.kill_worker_at_step != step or rank != world - 1:
        return
    marker = root / ".fault_injected"
    if marker.exists():
        return
    marker.write_text(str(step))
    log.warning(f"fault injection: killing rank {rank} (pid {os.getpid()}) at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def run_training(cfg, rank: int, world: int, device: str, use_deepspeed: bool,
                 report: Callable[[dict, Path | None], None] | None = None, stage: str = "base") -> dict:
    """Pretrain on this rank until the horizon; returns the final metrics."""
    from raychat.data.pretrain import PretrainStream
    from raychat.eval.bpb import evaluate_bpb, limit_tokens
    from raychat.model import GPTConfig, build_model
    from raychat.tokenizer import get_tokenizer
    from raychat.train import checkpointing
    from raychat.train.backend import DeepSpeedBackend, TorchBackend

    tc = cfg.pretrain
    dtype = resolve_dtype(tc.dtype, device)
    torch.set_float32_matmul_precision("high")
    tokenizer = get_tokenizer()
    model_config = GPTConfig(depth=tc.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=tc.max_seq_len)
    torch.manual_seed(cfg.run.seed)   # identical initial weights on every rank
    model = build_model(model_config, device)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    horizon = plan_horizon(tc, world, num_params, tc.target_param_data_ratio)
    schedule = Schedule(horizon.num_iterations, tc.warmup_ratio, tc.warmdown_ratio, tc.final_lr_frac)
    if use_deepspeed:
        backend = DeepSpeedBackend(model, tc, device, dtype, tc.device_batch_size, horizon.grad_accum_steps)
    else:
        backend = TorchBackend(model, tc, device, dtype)
        if tc.compile and device == "cuda":
            model.forward = torch.compile(model.forward)

    root = checkpoint_dir(stage, cfg.run.name, cfg.run.storage_path)
    start_step, cursor = 0, None
    resume = checkpointing.agreed_resume_checkpoint(root, rank, world)
    if resume is not None:
        checkpointing.check_resumable(resume, model_config, tokenizer, world, backend.kind)
        state = checkpointing.load_training_checkpoint(resume, backend, rank, world, device)
        start_step, cursor = state["step"], state["cursor"]
        log.info(f"resumed from {resume} at step {start_step}")
        if start_step >= horizon.num_iterations:   # submitted again after it finished: nothing to do
            metrics = json.loads((resume / "meta.json").read_text()).get("metrics", {})
            log.info(f"{stage} run '{cfg.run.name}' is already complete ({start_step} steps); use a new run.name "
                     f"or a longer horizon to train more")
            if report is not None:
                report(dict(metrics), resume)
            return metrics
    stream = PretrainStream(cfg, tokenizer, "train", tc.device_batch_size, tc.sequence_len, rank=rank,
                            world_size=world, cursor=cursor, use_ray=use_deepspeed)
    batches = _to_device(iter(stream), device)
    val_batches = None  # materialised on first use: the same rows at every evaluation

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(tensorboard_dir(stage, cfg.run.name)))
        log.info(f"{stage}: depth {tc.depth}, {num_params:,} parameters, {horizon.num_iterations} steps of "
                 f"{horizon.tokens_per_step:,} tokens ({horizon.grad_accum_steps} micro-batches of "
                 f"{tc.device_batch_size}x{tc.sequence_len} on {world} workers), {dtype} on {device}")
    peak = device_peak_flops(device)
    smooth_loss, metrics = None, {}
    t_start, steps_timed, time_timed = time.time(), 0, 0.0

    def evaluate(step: int) -> dict:
        nonlocal val_batches
        if val_batches is None:
            val_stream = PretrainStream(cfg, tokenizer, "val", tc.device_batch_size, tc.sequence_len, rank=rank,
                                        world_size=world, use_ray=False)
            val_batches = list(limit_tokens(val_stream, max(1, tc.eval_tokens // world)))
        with backend.autocast:
            bpb = evaluate_bpb(model, _to_device(iter(val_batches), device), tokenizer.token_bytes,
                               distributed=world > 1)
        result = {"val_bpb": bpb}
        if tc.core_every and (step % tc.core_every == 0 or step == horizon.num_iterations):
            result.update(_core(step))
        if rank == 0:
            log.info(f"step {step:05d} | val bpb {bpb:.4f}")
            writer.add_scalar("val/bpb", bpb, step)
            _log_samples(model, tokenizer, backend, writer, step)
        return result

    def _core(step: int) -> dict:
        """CORE on rank 0 while the others wait (in-process: no Ray inside the step loop)."""
        score = {}
        if rank == 0:
            from raychat.eval.core import evaluate_core
            with backend.autocast:
                core = evaluate_core(model, tokenizer, cfg, tc.core_max_per_task, device)
            score = {"core": core["core"]}
            log.info(f"step {step:05d} | CORE {core['core']:.4f}")
            writer.add_scalar("val/core", core["core"], step)
        if world > 1:
            torch.distributed.barrier()
        return score

    for step in range(start_step, horizon.num_iterations):
        _maybe_inject_fault(cfg, root, step, rank, world)
        result = train_step(backend, batches, step, schedule, horizon.grad_accum_steps)
        done = step + 1
        if step > start_step:  # the first step includes compilation / warm-up
            steps_timed += 1
            time_timed += result.seconds
        smooth_loss = result.loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * result.loss
        tokens_per_s = result.tokens / result.seconds
        mfu = flops_per_token * tokens_per_s / (peak * world) if peak else None
        metrics = {"step": done, "loss": result.loss, "smooth_loss": smooth_loss, "lr_mult": result.lr_mult,
                   "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                   "step_seconds": time_timed / steps_timed if steps_timed else result.seconds}
        if mfu is not None:
            metrics["mfu"] = mfu
        if rank == 0 and (done % tc.log_every == 0 or done == horizon.num_iterations or done == start_step + 1):
            eta = (time_timed / max(steps_timed, 1)) * (horizon.num_iterations - done)
            log.info(f"step {done:05d}/{horizon.num_iterations} ({100 * done / horizon.num_iterations:.1f}%) | "
                     f"loss {result.loss:.4f} | lr x{result.lr_mult:.2f} | grad {result.grad_norm:.3f} | "
                     f"{tokens_per_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") +
                     f" | eta {_format_eta(eta)}")
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, done)
        last = done == horizon.num_iterations
        if last or (tc.eval_every and done % tc.eval_every == 0):
            metrics.update(evaluate(done))
        if last or (tc.save_every and done % tc.save_every == 0):
            meta = {"stage": stage, "config": cfg.to_dict(), "model_config": model_config.to_dict(),
                    "tokenizer_fingerprint": tokenizer.fingerprint(), "metrics": metrics,
                    "num_params": num_params, "world_size": world, "trainer": backend.kind}
            path = checkpointing.save_training_checkpoint(root, done, model, backend, stream.state_dict(),
                                                          meta, rank, world)
            if report is not None:
                report(dict(metrics), path)
    if rank == 0:
        log.info(f"done: {horizon.num_iterations} steps in {_format_eta(time.time() - t_start)}; "
                 f"final loss {metrics.get('loss', float('nan')):.4f}, val bpb {metrics.get('val_bpb', float('nan')):.4f}")
        writer.close()
    metrics["total_seconds"] = time.time() - t_start
    return metrics


def _to_device(batches, device: str):
    for inputs, targets in batches:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def _log_samples(model, tokenizer, backend, writer, step: int) -> None:
    """Greedy completions of fixed prompts, printed and written to TensorBoard."""
    from raychat.engine import Engine
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in SAMPLE_PROMPTS]
    model.eval()
    with backend.autocast:
        results, _ = engine.generate_many(prompts, max_tokens=16, temperature=0.0)
    model.train()
    lines = [tokenizer.decode(r[1:]) for r in results]
    for line in lines:
        log.info(f"sample: {json.dumps(line)}")
    writer.add_text("samples", "\n\n".join(lines), step)
