"""Ray Train: one TorchTrainer worker per GPU (or CPU slot), each running the shared training loop for a
stage. Ray owns placement, the process group and restarts: when a worker dies, the whole group is
restarted (FailureConfig) and the loop resumes from the latest complete checkpoint on storage.
"""
from __future__ import annotations

import os
from pathlib import Path

from raychat.common import GPU_ENV, LOCAL_RAY_ENV, UserError, checkpoint_dir, get_base_dir


def train_loop_per_worker(config: dict) -> None:
    """Runs inside each Ray Train worker; the process group is already set up by Ray (gloo or NCCL)."""
    import ray.train
    import torch

    from raychat.config import Config
    from raychat.train.loop import run_stage
    from raychat.train.stage import make_stage

    cfg = Config.from_dict(config["cfg"])
    stage = make_stage(config["stage"], cfg, config["plan"])
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":   # not honoured inside workers by itself
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["RANK"] = str(rank)   # rank-aware logging
    if stage.section.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
        device = "cuda"
    else:
        device = "cpu"
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    def report(metrics: dict, checkpoint_path: Path | None) -> None:
        # The checkpoint is already complete on storage (raychat's own layout); Ray only records where it is.
        checkpoint = None
        if checkpoint_path is not None and rank == 0:
            checkpoint = ray.train.Checkpoint(str(checkpoint_path))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_fn=(lambda ckpt, _dest: ckpt) if checkpoint is not None else None)

    run_stage(stage, rank, world, device, use_deepspeed=stage.section.deepspeed, report=report)


def check_resources(spec) -> None:
    """Start or join Ray; a local Ray cannot grow, so too few GPUs is an error now instead of a hang."""
    from raychat.common import init_ray
    section = spec.section
    cluster = init_ray()
    if section.use_gpu and not os.environ.get("RAY_ADDRESS"):
        gpus = int(cluster.cluster_resources().get("GPU", 0))
        if gpus < section.num_workers:
            raise UserError(f"{spec.section_name} needs {section.num_workers} GPU workers but this machine has "
                            f"{gpus} GPU(s); use --preset demo, or --set {spec.section_name}.use_gpu=false "
                            f"--set {spec.section_name}.num_workers=N")


def fit(cfg, stage: str = "base", plan: dict | None = None):
    """Launch a training stage on the Ray cluster (local or RAY_ADDRESS); returns the Ray Train Result.
    `plan` is the stage's preflight result (computed here when not given)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raychat.config import parse_resources
    from raychat.train.stage import make_stage

    spec = make_stage(stage, cfg)
    section = spec.section
    check_resources(spec)
    plan = dict(plan if plan is not None else spec.preflight(), ray_data=cfg.data.ray_data)
    env_vars = {k: os.environ.get(k, v) for k, v in {**LOCAL_RAY_ENV, **GPU_ENV}.items()}
    env_vars.update({k: os.environ[k] for k in ("RAYCHAT_BASE_DIR", "RAYCHAT_DATA_DIR", "RAYCHAT_LOG_LEVEL")
                     if k in os.environ})
    env_vars.setdefault("RAYCHAT_BASE_DIR", str(get_base_dir()))
    if not section.use_gpu:
        env_vars.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    resources = {"CPU": section.cpus_per_worker,
                 **parse_resources(section.resources_per_worker, f"{spec.section_name}.resources_per_worker")}
    if section.use_gpu:
        resources["GPU"] = spec.learner_gpus()
    # Ray's experiment directory IS raychat's checkpoint directory, so the checkpoints raychat writes there
    # (its own atomic, checksummed layout) are registered with Ray without being copied.
    root = checkpoint_dir(spec.name, cfg.run.name, cfg.run.storage_path)
    root.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "plan": plan},
        torch_config=TorchConfig(backend="nccl" if section.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=root.name,
            storage_path=str(root.parent),
            failure_config=ray.train.FailureConfig(max_failures=section.max_failures),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    return trainer.fit()
