"""Ray Train: one TorchTrainer worker per GPU (or CPU slot), each running the shared training loop with a
DeepSpeed engine. Ray owns placement, the process group and restarts: when a worker dies, the whole group
is restarted (FailureConfig) and the loop resumes from the latest complete checkpoint on storage.
"""
from __future__ import annotations

import os
from pathlib import Path

from raychat.common import LOCAL_RAY_ENV, UserError, checkpoint_dir, get_base_dir


def train_loop_per_worker(config: dict) -> None:
    """Runs inside each Ray Train worker; the process group is already set up by Ray (gloo or NCCL)."""
    import ray.train
    import torch

    from raychat.config import Config
    from raychat.train.loop import run_training

    cfg = Config.from_dict(config["cfg"])
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":   # not honoured inside workers by itself
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["RANK"] = str(rank)   # rank-aware logging
    use_gpu = config["use_gpu"]
    device = "cuda" if use_gpu else "cpu"
    if use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    def report(metrics: dict, checkpoint_path: Path | None) -> None:
        # The checkpoint is already complete on storage (raychat's own layout); Ray only records where it is.
        checkpoint = None
        if checkpoint_path is not None and rank == 0:
            checkpoint = ray.train.Checkpoint(str(checkpoint_path))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_fn=(lambda ckpt, _dest: ckpt) if checkpoint is not None else None)

    run_training(cfg, rank, world, device, use_deepspeed=True, report=report, stage=config["stage"])


def fit(cfg, stage: str = "base"):
    """Launch the stage on the Ray cluster (local or RAY_ADDRESS); returns the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raychat.common import init_ray

    tc = cfg.pretrain
    cluster = init_ray()
    if tc.use_gpu and not os.environ.get("RAY_ADDRESS"):   # a local Ray cannot grow: say so instead of hanging
        gpus = int(cluster.cluster_resources().get("GPU", 0))
        if gpus < tc.num_workers:
            raise UserError(f"pretrain needs {tc.num_workers} GPU workers but this machine has {gpus} GPU(s); "
                            f"use --preset demo, or --set pretrain.use_gpu=false --set pretrain.num_workers=N")
    env_vars = {k: os.environ.get(k, v) for k, v in LOCAL_RAY_ENV.items()}
    env_vars.update({k: os.environ[k] for k in ("RAYCHAT_BASE_DIR", "RAYCHAT_DATA_DIR", "RAYCHAT_LOG_LEVEL")
                     if k in os.environ})
    env_vars.setdefault("RAYCHAT_BASE_DIR", str(get_base_dir()))
    if not tc.use_gpu:
        env_vars.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    # Ray's experiment directory IS raychat's checkpoint directory, so the checkpoints raychat writes there
    # (its own atomic, checksummed layout) are registered with Ray without being copied.
    root = checkpoint_dir(stage, cfg.run.name, cfg.run.storage_path)
    root.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "use_gpu": tc.use_gpu},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=root.name,
            storage_path=str(root.parent),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    return trainer.fit()
