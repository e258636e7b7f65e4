"""Ray Train + DeepSpeed trainer vs the bare loop (no Ray, no DeepSpeed) on the same config and machine.

    python bench/train.py [--steps 40] [--repeats 3] [--depth 4]

Both run the shared loop (raychat/train/loop.py) for the same steps; the time per optimizer step excludes
the first step (warm-up) and start-up. Prints tokens/s of each, the ratio (target >= 0.97 with one worker
on CPU), and the bare loop's MFU against this machine's measured fp32 matmul peak (same thread count).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    if not os.environ.get("RAYCHAT_DATA_DIR"):
        sys.exit("set RAYCHAT_DATA_DIR to the offline datasets (shared/data)")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    base = Path(tempfile.mkdtemp(prefix="raychat_bench_train_"))
    os.environ["RAYCHAT_BASE_DIR"] = str(base)

    from raychat.config import load_config
    from raychat.data.fineweb import iter_documents, shard_paths
    from raychat.model import GPTConfig, build_model
    from raychat.tokenizer import RustBPETokenizer
    from raychat.train.base import BaseStage
    from raychat.train.loop import run_stage
    from raychat.train.ray_trainer import fit

    def run_bare(cfg):
        plan = BaseStage(cfg).preflight()
        return run_stage(BaseStage(cfg, {**plan, "ray_data": False}), 0, 1, "cpu", use_deepspeed=False)

    overrides = [f"pretrain.depth={args.depth}", "pretrain.sequence_len=256", "pretrain.max_seq_len=256",
                 "pretrain.device_batch_size=8", "pretrain.total_batch_size=2048", "pretrain.num_workers=1",
                 "pretrain.cpus_per_worker=1", f"pretrain.num_iterations={args.steps}", "pretrain.save_every=0",
                 "pretrain.eval_every=0", "pretrain.eval_tokens=2048", "pretrain.log_every=1000"]
    cfg = load_config("demo", overrides)
    texts = [t[:10_000] for t, _ in zip(iter_documents(shard_paths(cfg, "train")), range(600))]
    RustBPETokenizer.train_from_iterator(texts, 4096).save(base / "tokenizer")

    bare, ray_ = [], []
    for i in range(args.repeats):
        cfg = load_config("demo", overrides + [f"run.name=bare{i}"])
        bare.append(run_bare(cfg)["step_seconds"])
        cfg = load_config("demo", overrides + [f"run.name=ray{i}"])
        ray_.append(fit(cfg).metrics["step_seconds"])
        print(f"repeat {i}: bare {bare[-1] * 1000:.1f} ms/step, ray+deepspeed {ray_[-1] * 1000:.1f} ms/step", flush=True)
    tokens = cfg.pretrain.total_batch_size
    bare_tps, ray_tps = tokens / min(bare), tokens / min(ray_)
    model = build_model(GPTConfig(depth=args.depth, vocab_size=4096, sequence_len=256), "meta", init=False)
    peak = matmul_peak_flops()
    mfu = model.estimate_flops() * bare_tps / peak
    print(f"depth {args.depth}, seq 256, batch 8, {args.steps} steps, best of {args.repeats}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"bare loop:           {bare_tps:10,.0f} tok/s")
    print(f"Ray Train+DeepSpeed: {ray_tps:10,.0f} tok/s")
    print(f"ratio ray/bare:      {ray_tps / bare_tps:.3f}  (target >= 0.97)")
    print(f"bare MFU vs measured fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s): {100 * mfu:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
