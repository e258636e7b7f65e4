"""The training loop without Ray or DeepSpeed: one process, or several GPUs under torchrun.

    python -m raychat.train.bare --preset demo --set pretrain.num_iterations=20
    torchrun --nproc_per_node 8 -m raychat.train.bare --preset d20

Same loop, same step, same checkpoints as the Ray trainer (with the plain-torch backend), so Ray +
DeepSpeed overhead is measured, not guessed (bench/train.py), and a GPU machine without Ray can still
train. Rank 0 runs the stage's preflight (downloads) before the others start.
"""
from __future__ import annotations

import argparse
import os
import sys

from raychat.common import GPU_ENV, UserError, detect_device
from raychat.config import ConfigError, load_config

for _key, _value in GPU_ENV.items():   # before CUDA starts
    os.environ.setdefault(_key, _value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raychat.train.bare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="d20")
    parser.add_argument("--stage", default="base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        import torch
        import torch.distributed as dist

        from raychat.train.loop import run_stage
        from raychat.train.stage import make_stage
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        spec = make_stage(args.stage, cfg)
        device = detect_device() if spec.section.use_gpu else "cpu"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        plan = [spec.preflight() if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(plan, src=0)
        spec = make_stage(args.stage, cfg, {**plan[0], "ray_data": False})
        metrics = run_stage(spec, rank, world, device, use_deepspeed=False)
        if world > 1:
            dist.destroy_process_group()
        if rank == 0:
            print(f"bare: {metrics['step']} steps, loss {metrics['loss']:.4f}, "
                  f"{metrics['step_seconds'] * 1000:.1f} ms/step")
        return 0
    except (ConfigError, UserError) as error:
        print(f"raychat: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
