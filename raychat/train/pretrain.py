"""`raychat train base`: pretrain the base model on Ray Train + DeepSpeed.

Everything a user can get wrong (no tokenizer, no data, a batch that does not divide) is checked here in
the driver, before any worker starts, so it is reported as one line.
"""
from __future__ import annotations

import json
import time

from raychat.common import UserError, checkpoint_dir, get_logger, report_dir
from raychat.train.checkpointing import check_resumable, latest_training_checkpoint
from raychat.train.loop import plan_horizon

log = get_logger("raychat.train")


def preflight(cfg) -> dict:
    """Check the tokenizer, the data and the horizon; returns a summary for the log."""
    import torch

    from raychat.data.fineweb import shard_paths
    from raychat.model import GPT, GPTConfig
    from raychat.tokenizer import get_tokenizer

    tc = cfg.pretrain
    tokenizer = get_tokenizer()
    shard_paths(cfg, "train")   # downloads what the preset needs (rank 0 of nothing: the driver)
    shard_paths(cfg, "val")
    model_config = GPTConfig(depth=tc.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=tc.max_seq_len)
    with torch.device("meta"):
        model = GPT(model_config)
    num_params = model.num_params()
    horizon = plan_horizon(tc, tc.num_workers, num_params, tc.target_param_data_ratio)
    resume = latest_training_checkpoint(checkpoint_dir("base", cfg.run.name, cfg.run.storage_path))
    if resume is not None:   # checked here too, so a mismatch is one line and not retried by every worker
        check_resumable(resume, model_config, tokenizer, tc.num_workers, "deepspeed")
    return {"num_params": num_params, "num_iterations": horizon.num_iterations,
            "grad_accum_steps": horizon.grad_accum_steps}


def main(cfg, args) -> int:
    summary = preflight(cfg)
    log.info(f"train base: {summary['num_params']:,} parameters, {summary['num_iterations']} steps, "
             f"{cfg.pretrain.num_workers} workers, checkpoints in "
             f"{checkpoint_dir('base', cfg.run.name, cfg.run.storage_path)}")
    from raychat.train.ray_trainer import fit
    t0 = time.time()
    try:
        result = fit(cfg, stage="base")
    except UserError:
        raise
    except Exception as error:   # Ray Train raises once the workers have failed max_failures + 1 times
        raise UserError(f"training failed: {failure_summary(error)}") from error
    metrics = dict(result.metrics or {})
    summary.update(metrics, seconds=time.time() - t0,
                   checkpoint=str(result.checkpoint.path) if result.checkpoint else None)
    out = report_dir() / "base_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out)
    print(f"base model trained: loss {metrics.get('loss', float('nan')):.4f}, val bpb "
          f"{metrics.get('val_bpb', float('nan')):.4f}, {summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}")
    return 0


def failure_summary(error: BaseException) -> str:
    """One line for a failed run: a worker's UserError message if there is one, else the last line of the
    first worker's error (the full tracebacks are in the Ray logs above)."""
    failures = list(getattr(error, "worker_failures", {}).items()) or [(None, error)]
    for rank, failure in failures:
        seen, cause = set(), failure
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, UserError):
                return f"rank {rank}: {cause}" if rank is not None else str(cause)
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    rank, failure = failures[0]
    lines = [line for line in str(failure).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(failure).__name__
    return f"rank {rank}: {last}" if rank is not None else last
