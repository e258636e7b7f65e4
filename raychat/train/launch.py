"""The driver of every training stage (`raychat train base`, and the chat stages next).

Everything a user can get wrong (no tokenizer, no data, a batch that does not divide, a checkpoint that
belongs to another run, too few GPUs) is checked here, before any worker starts, so it is reported as one
line. The stage's preflight fetches everything the workers need; then Ray Train runs the shared loop on
every worker, and a failure of the workers ends in one line too.
"""
from __future__ import annotations

import json
import time

from raychat.common import UserError, atomic_write, checkpoint_dir, get_logger, report_dir

log = get_logger("raychat.train")


def check_resumable_in_driver(spec, tokenizer) -> None:
    """A mismatching checkpoint is refused here once, not retried by every worker max_failures times."""
    from raychat.train.checkpointing import check_resumable, latest_training_checkpoint
    root = checkpoint_dir(spec.name, spec.cfg.run.name, spec.cfg.run.storage_path)
    resume = latest_training_checkpoint(root)
    if resume is not None:
        check_resumable(resume, spec.model_config(tokenizer), tokenizer, spec.section.num_workers,
                        "deepspeed" if spec.section.deepspeed else "torch")


def train_main(cfg, args) -> int:
    """`raychat train STAGE`: preflight, train on Ray, write report/{stage}_train.json."""
    from raychat.tokenizer import get_tokenizer
    from raychat.train.ray_trainer import check_resources, fit
    from raychat.train.stage import make_stage

    spec = make_stage(args.subcommand, cfg)
    check_resources(spec)
    plan = spec.preflight()
    check_resumable_in_driver(spec, get_tokenizer())
    root = checkpoint_dir(spec.name, cfg.run.name, cfg.run.storage_path)
    log.info(f"train {spec.name}: {spec.describe(plan)}; {spec.section.num_workers} workers; checkpoints in {root}")
    t0 = time.time()
    try:
        result = fit(cfg, spec.name, plan)
    except UserError:
        raise
    except Exception as error:   # Ray Train raises once the workers have failed max_failures + 1 times
        raise UserError(f"{spec.name} training failed: {failure_summary(error)}") from error
    metrics = dict(result.metrics or {})
    summary = {**plan, **metrics, "seconds": time.time() - t0,
               "checkpoint": str(result.checkpoint.path) if result.checkpoint else None}
    out = report_dir() / f"{spec.name}_train.json"
    atomic_write(out, json.dumps(summary, indent=2, default=str))
    scores = "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") or k == "core")
    print(f"{spec.name} model trained: loss {metrics.get('loss', float('nan')):.4f}{scores}, "
          f"{summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}")
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
