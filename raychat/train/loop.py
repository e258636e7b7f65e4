"""The training loop every stage shares, around `train_step`; run by the Ray trainer and the bare trainer.

Per rank: build the stage's model (same seed everywhere), plan the horizon, resume from the latest
complete checkpoint if there is one (weights, optimizer state, data cursor, RNG, step), then step;
log, evaluate and checkpoint at the configured intervals. What differs between stages (model start,
data, horizon, evaluations, loss, hooks) comes from the stage (stage.py).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from raychat.common import UserError, checkpoint_dir, get_logger, resolve_dtype, tensorboard_dir
from raychat.train.stage import RunContext, Stage
from raychat.train.step import train_step

log = get_logger("raychat.train")

# bf16 dense peak FLOP/s per device, for MFU (H100/H200 SXM: 989 TFLOP/s)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def worker_device(device: str) -> str:
    """The rank's own device: "cuda" becomes "cuda:N" for the current device (set by Ray or torchrun),
    so that weights and states load there and not on cuda:0 for every rank of a node."""
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return device


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


def make_backend(stage: Stage, model, device: str, horizon, use_deepspeed: bool):
    from raychat.train.backend import DeepSpeedBackend, TorchBackend
    section = stage.section
    dtype = resolve_dtype(section.dtype, device)
    compile = section.compile and torch.device(device).type == "cuda"
    if use_deepspeed:
        return DeepSpeedBackend(model, section, device, dtype, horizon.micro_batch_size, horizon.grad_accum_steps,
                                compile)
    return TorchBackend(model, section, device, dtype, compile)


def run_stage(stage: Stage, rank: int, world: int, device: str, use_deepspeed: bool,
              report: Callable[[dict, Path | None], None] | None = None) -> dict:
    """Train `stage` on this rank until its horizon; returns the final metrics."""
    from raychat.tokenizer import get_tokenizer
    from raychat.train import checkpointing

    cfg, section = stage.cfg, stage.section
    device = worker_device(device)
    torch.set_float32_matmul_precision("high")
    tokenizer = get_tokenizer()
    torch.manual_seed(cfg.run.seed)   # identical initial weights on every rank
    start = stage.build_model(tokenizer, device)
    model = start.model
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    horizon = stage.horizon(world, num_params)
    schedule = stage.schedule(horizon)
    backend = make_backend(stage, model, device, horizon, use_deepspeed)

    root = checkpoint_dir(stage.name, cfg.run.name, cfg.run.storage_path)
    start_step, cursor = 0, None
    resume = checkpointing.agreed_resume_checkpoint(root, rank, world)
    if resume is not None:
        checkpointing.check_resumable(resume, model.config, tokenizer, world, backend.kind)
        state = checkpointing.load_training_checkpoint(resume, backend, rank, device)
        start_step, cursor = state["step"], state["cursor"]
        log.info(f"resumed from {resume} at step {start_step}")
        if start_step >= horizon.num_iterations:   # submitted again after it finished: nothing to do
            metrics = json.loads((resume / "meta.json").read_text()).get("metrics", {})
            log.info(f"{stage.name} run '{cfg.run.name}' is already complete ({start_step} steps); use a new "
                     f"run.name or a longer horizon to train more")
            if report is not None:
                report(dict(metrics), resume)
            return metrics
    stream = stage.train_data(tokenizer, rank, world, horizon.micro_batch_size, cursor)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(tensorboard_dir(stage.name, cfg.run.name)))
        log.info(f"{stage.name}: {num_params:,} parameters, {horizon.num_iterations} steps of "
                 f"{horizon.tokens_per_step:,} tokens ({horizon.grad_accum_steps} micro-batches of "
                 f"{horizon.micro_batch_size} rows on each of {world} workers), {resolve_dtype(section.dtype, device)} "
                 f"on {device}, {backend.kind}")
    ctx = RunContext(cfg, model, tokenizer, backend, rank, world, device, writer)
    evaluations = stage.evaluations()
    peak = device_peak_flops(device)
    smooth_loss, metrics = None, {}
    t_start, steps_timed, time_timed = time.time(), 0, 0.0
    first_epoch = None
    last_log = (start_step, 0.0)   # (step, cumulative data wait) at the previous log line

    for step in range(start_step, horizon.num_iterations):
        _maybe_inject_fault(cfg, root, step, rank, world)
        try:
            result = train_step(backend, stream, step, schedule, horizon.grad_accum_steps, stage.loss_fn,
                                stage.loss_normalizer)
        except torch.cuda.OutOfMemoryError as error:
            raise UserError(f"out of GPU memory at {horizon.micro_batch_size} rows per micro-batch: set "
                            f"{stage.section_name}.memory_split={2 * section.memory_split} (same tokens per step, "
                            f"more accumulation) or a smaller device_batch_size") from error
        stage.after_step(ctx, step, result)
        done = step + 1
        if step > start_step:  # the first step includes compilation / warm-up
            steps_timed += 1
            time_timed += result.seconds
        if not result.skipped:
            smooth_loss = result.loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * result.loss
        tokens_per_s = result.tokens / result.seconds
        mfu = flops_per_token * tokens_per_s / (peak * world) if peak else None
        metrics = {"step": done, "loss": result.loss, "smooth_loss": smooth_loss, "lr_mult": result.lr_mult,
                   "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                   "step_seconds": time_timed / steps_timed if steps_timed else result.seconds}
        if mfu is not None:
            metrics["mfu"] = mfu
        data = stream.stats() if hasattr(stream, "stats") else {}
        if "epoch" in data:
            first_epoch = data["epoch"] if first_epoch is None else first_epoch
            if data["epoch"] > first_epoch and rank == 0:
                message = stage.wrap_warning(data["epoch"], done, horizon)
                if message:
                    log.warning(message)
                first_epoch = data["epoch"]
        if rank == 0 and (done % section.log_every == 0 or done == horizon.num_iterations or done == start_step + 1):
            eta = (time_timed / max(steps_timed, 1)) * (horizon.num_iterations - done)
            wait_ms = 1000 * (data.get("wait_s", 0.0) - last_log[1]) / max(done - last_log[0], 1)
            last_log = (done, data.get("wait_s", 0.0))
            data_part = (f" | epoch {data['epoch'] + 1} cropped {100 * data.get('cropped_fraction', 0):.0f}% "
                         f"wait {wait_ms:.0f} ms" if "epoch" in data else "")
            log.info(f"step {done:05d}/{horizon.num_iterations} ({100 * done / horizon.num_iterations:.1f}%) | "
                     f"loss {result.loss:.4f} | lr x{result.lr_mult:.2f} | grad {result.grad_norm:.3f} | "
                     f"{tokens_per_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") +
                     data_part + f" | eta {_format_eta(eta)}" + (" | skipped: no supervised token" if result.skipped else ""))
            for key, value in metrics.items():
                if key != "step" and value is not None:
                    writer.add_scalar(f"train/{key}", value, done)
            if "epoch" in data:
                writer.add_scalar("data/epoch", data["epoch"], done)
                writer.add_scalar("data/cropped_fraction", data.get("cropped_fraction", 0.0), done)
                writer.add_scalar("data/wait_ms_per_step", wait_ms, done)
        last = done == horizon.num_iterations
        for evaluation in evaluations:
            if evaluation.due(done, last):
                scores = evaluation.run(ctx, done)
                metrics.update(scores)
                if rank == 0 and scores:
                    log.info(f"step {done:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                    for key, value in scores.items():
                        writer.add_scalar(f"val/{key}", value, done)
        if last or (section.save_every and done % section.save_every == 0):
            meta = {"stage": stage.name, "config": cfg.to_dict(), "model_config": model.config.to_dict(),
                    "tokenizer_fingerprint": tokenizer.fingerprint(), "metrics": metrics, "parent": start.parent,
                    "num_params": num_params, "world_size": world, "trainer": backend.kind,
                    "num_iterations": horizon.num_iterations}   # the planned last step: "complete" = step == this
            path = checkpointing.save_training_checkpoint(root, done, model, backend, stream.state_dict(),
                                                          meta, rank, world)
            if rank == 0:
                checkpointing.prune_checkpoints(root, cfg.run.keep_checkpoints, horizon.num_iterations)
            if report is not None:
                report(dict(metrics), path)
    if rank == 0:
        log.info(f"done: {horizon.num_iterations} steps in {_format_eta(time.time() - t_start)}; final loss "
                 f"{metrics.get('loss', float('nan')):.4f}" +
                 "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") or k == "core"))
        writer.close()
    metrics["total_seconds"] = time.time() - t_start
    return metrics


def log_samples(ctx: RunContext, prompts: list[list[int]], step: int, max_tokens: int = 16) -> list[str]:
    """Greedy completions of fixed prompts (token ids), printed and written to TensorBoard. Runs the eager
    model: decoding shapes change at every step and must not touch the compiled training graph."""
    from raychat.engine import Engine
    engine = Engine(ctx.model, ctx.tokenizer)
    ctx.model.eval()
    try:
        with ctx.backend.autocast:
            results, _ = engine.generate_many(prompts, max_tokens=max_tokens, temperature=0.0)
    finally:
        ctx.model.train()
    lines = [ctx.tokenizer.decode(r[1:]) for r in results]
    for line in lines:
        log.info(f"sample: {json.dumps(line)}")
    if ctx.writer is not None:
        ctx.writer.add_text("samples", "\n\n".join(lines), step)
    return lines
