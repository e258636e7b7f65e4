"""The GPU check for a lent GPU machine (one CUDA GPU, no Ray): the d20 trainer exactly as a Ray worker runs
it, at world size 1, and the inference engine. Prints one JSON line (and writes it to --out).

    bash bench/gpu.sh                 # on a CUDA machine with torch, deepspeed, safetensors, tiktoken
    bash bench/gpu.sh --dry-run       # the same code path on CPU at depth 2 (the tests run this)

1. Training: d20 (vocab 65,536, sequence 2,048, device batch 32, 524,288 tokens per step) through the
   DeepSpeed backend (ZeRO-2 for AdamW + raychat's Muon), bf16 autocast, torch.compile of the step's
   forward, the chunked loss. Peak memory, tokens/s, MFU against the device's bf16 peak. If batch 32 runs
   out of memory, the script says so and retries with pretrain.memory_split=2 (16 rows x 2).
2. Compile scope: a bits-per-byte pass and greedy samples after the timed steps, then one more step;
   dynamo's counters must not move (evaluation runs the eager model).
3. Save and resume on the GPU: checkpoint, one step, load the checkpoint back, the same step again: the
   loss and the weights must come out the same.
4. Decoding: KV-cache engine tokens/s at 1 and 8 rows (64-token prompt, 128 new tokens).
Target on an H100/H200: MFU >= 50 % (nanochat's level), peak memory < 80 GB, whole run <= 8 minutes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raychat.config import load_config  # noqa: E402
from raychat.engine import Engine  # noqa: E402
from raychat.eval.bpb import bpb_totals  # noqa: E402
from raychat.model import GPTConfig, build_model  # noqa: E402
from raychat.train.backend import DeepSpeedBackend, TorchBackend  # noqa: E402
from raychat.train.base import plan_horizon  # noqa: E402
from raychat.train.checkpointing import load_training_checkpoint, save_training_checkpoint  # noqa: E402
from raychat.train.loop import device_peak_flops, worker_device  # noqa: E402
from raychat.train.step import Schedule, train_step  # noqa: E402


def init_single_process_group(device: str) -> None:
    """World size 1, as a Ray worker of a 1-GPU run sees it (DeepSpeed needs a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)


def random_batches(vocab: int, rows: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (rows, seq_len + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args, device, split: int):
    cfg = load_config("d20", [f"pretrain.depth={args.depth}", f"pretrain.sequence_len={args.seq_len}",
                              f"pretrain.max_seq_len={args.seq_len}", f"pretrain.device_batch_size={args.batch}",
                              f"pretrain.total_batch_size={args.total_batch}", f"pretrain.memory_split={split}",
                              "pretrain.zero_stage=2"])
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=args.depth, vocab_size=args.vocab, sequence_len=args.seq_len), device)
    horizon = plan_horizon(cfg.pretrain, 1, model.num_params(), 20)
    if args.backend == "deepspeed":
        backend = DeepSpeedBackend(model, cfg.pretrain, device, "bf16", horizon.micro_batch_size,
                                   horizon.grad_accum_steps, compile=args.compile)
    else:
        backend = TorchBackend(model, cfg.pretrain, device, "bf16", compile=args.compile)
    return cfg, model, horizon, backend


def train_and_time(args, device):
    """Warm-up (compilation) and timed steps; on out-of-memory at full batch, retry with memory_split=2."""
    for split in (1, 2):
        model = backend = None
        try:
            cfg, model, horizon, backend = build(args, device, split)
            batches = random_batches(args.vocab, horizon.micro_batch_size, args.seq_len, seed=1)
            schedule = Schedule(1000)
            t0 = time.perf_counter()
            for step in range(args.warmup):
                train_step(backend, batches, step, schedule, horizon.grad_accum_steps)
            synchronize(device)
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            losses = []
            for step in range(args.warmup, args.warmup + args.steps):
                losses.append(train_step(backend, batches, step, schedule, horizon.grad_accum_steps).loss)
            synchronize(device)
            step_s = (time.perf_counter() - t0) / args.steps
            return cfg, model, horizon, backend, batches, {"memory_split": split, "compile_and_warmup_s": round(compile_s, 1),
                                                           "step_s": round(step_s, 4), "losses": [round(x, 4) for x in losses]}
        except torch.cuda.OutOfMemoryError as error:
            print(f"out of memory at memory_split={split}: {str(error).splitlines()[0]}", file=sys.stderr)
            if split == 2:
                raise
            del model, backend   # the exception's traceback holds the frames: drop it before freeing memory
            error = None
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def compile_scope(model, backend, batches, horizon, args, device) -> dict:
    """Evaluation and sampling after training steps must not recompile (or run) the training graph."""
    from torch._dynamo.utils import counters
    before, frames = dict(counters["stats"]), counters["frames"]["total"]
    val = [next(random_batches(args.vocab, 4, args.seq_len, seed=2)) for _ in range(2)]
    model.eval()
    with backend.autocast:
        bpb_totals(model, val, torch.ones(args.vocab, dtype=torch.long))
        Engine(model).generate_many([[1, 2, 3], [4, 5, 6, 7, 8]], max_tokens=8, temperature=0.0)
    model.train()
    eager_frames = counters["frames"]["total"] - frames
    train_step(backend, batches, 10_000, Schedule(100_000), horizon.grad_accum_steps)
    return {"eval_frames_compiled": eager_frames, "graphs_added_after_eval": dict(counters["stats"]) != before}


def save_and_resume(model, backend, horizon, args, device) -> dict:
    """Checkpoint, one step, load the checkpoint back, the same step again: same loss, same weights."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as root:
        t0 = time.perf_counter()
        path = save_training_checkpoint(Path(root), 1, model, backend, {"cursor": "gpu-check"}, {"stage": "gpu"}, 0, 1)
        save_s = time.perf_counter() - t0
        size_gib = sum(f.stat().st_size for f in path.iterdir()) / 2**30

        def one_step():
            batches = random_batches(args.vocab, horizon.micro_batch_size, args.seq_len, seed=3)
            result = train_step(backend, batches, 20_000, Schedule(100_000), horizon.grad_accum_steps)
            return result.loss, {k: v.detach().clone() for k, v in model.state_dict().items()}

        loss_a, weights_a = one_step()
        t0 = time.perf_counter()
        load_training_checkpoint(path, backend, 0, device)
        load_s = time.perf_counter() - t0
        loss_b, weights_b = one_step()
        load_training_checkpoint(path, backend, 0, device)   # the same step once more from the same state:
        _, weights_c = one_step()                             # what GPU non-determinism alone changes

    def max_rel(a, b):
        return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    return {"save_s": round(save_s, 1), "load_s": round(load_s, 1), "checkpoint_gib": round(size_gib, 2),
            "loss_after_save": loss_a, "loss_after_resume": loss_b, "weights_max_rel_diff": max_rel(weights_a, weights_b),
            "same_state_twice_max_rel_diff": max_rel(weights_b, weights_c)}


def decode_speed(model, args, device) -> dict:
    model.eval()
    engine, out = Engine(model), {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for samples in (1, 8):
        prompt = torch.randint(0, args.vocab, (64,)).tolist()
        with autocast:
            list(engine.generate(prompt, num_samples=samples, max_tokens=8, temperature=1.0))   # warm-up
            synchronize(device)
            t = time.perf_counter()
            n = sum(1 for _ in engine.generate(prompt, num_samples=samples, max_tokens=args.new_tokens, temperature=1.0))
            synchronize(device)
        out[f"decode_tok_s_{samples}"] = round(n * samples / (time.perf_counter() - t), 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, depth 2, tiny batches: exercises every path")
    parser.add_argument("--out", default=None, help="also write the JSON line here")
    parser.add_argument("--tmp", default=None, help="directory for the checkpoint round trip")
    args = parser.parse_args(argv)
    if args.dry_run:
        device = "cpu"
        args.depth, args.vocab, args.seq_len, args.batch, args.total_batch = 2, 512, 64, 4, 512
        args.warmup, args.steps, args.new_tokens, args.compile = 1, 2, 8, "aot_eager"
    else:
        assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU (or --dry-run)"
        torch.cuda.set_device(0)
        device = worker_device("cuda")
        args.depth, args.vocab, args.seq_len, args.batch, args.total_batch = 20, 65536, 2048, 32, 524_288
        args.warmup, args.steps, args.new_tokens, args.compile = 3, 5, 128, True
    t_start = time.perf_counter()
    torch.set_float32_matmul_precision("high")   # as the training loop does
    try:
        import deepspeed  # noqa: F401
        args.backend = "deepspeed"
    except ImportError as error:   # still measure the model, step and engine: say which backend ran
        args.backend = "torch"
        print(f"deepspeed cannot be imported ({error}): measuring the plain-torch backend", file=sys.stderr)
    init_single_process_group(device)
    cfg, model, horizon, backend, batches, training = train_and_time(args, device)
    tokens_per_s = args.total_batch / training["step_s"]
    peak = device_peak_flops(device) or 989e12
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (dry run)",
              "torch": torch.__version__, "backend": args.backend, "params": model.num_params(), "flops_per_token": model.estimate_flops(),
              "device_batch": args.batch, "micro_batch": horizon.micro_batch_size,
              "grad_accum": horizon.grad_accum_steps, "seq_len": args.seq_len, **training,
              "tokens_per_s": round(tokens_per_s), "mfu": round(model.estimate_flops() * tokens_per_s / peak, 4),
              "peak_flops": peak}
    if device.startswith("cuda"):
        result["train_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        result["train_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 1)
    result["compile_scope"] = compile_scope(model, backend, batches, horizon, args, device)
    result["resume"] = save_and_resume(model, backend, horizon, args, device)
    result.update(decode_speed(model, args, device))
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
