"""Pretraining data benchmark: does the token stream keep up?

    RAYCHAT_DATA_DIR=../shared/data flock /tmp/raychat_cpu.lock python bench/data.py [--repeats 3]

1. Throughput: tokens/s that the Ray Data stream (`PretrainStream`, use_ray=True) delivers to 2 consumers
   (2 Ray actors, ranks 0 and 1 of 2, as the train workers are), reading 6 epochs of the train shards,
   vs the raw tiktoken encode rate on the same documents in one process (`tokenizer.encode(docs)`, the
   tokenizer's own threads). The plain iterator (use_ray=False) in the same 2 actors is shown too.
2. Does data stall training, in the configuration the demo runs: 2 train workers (2 Ray actors of 0.5 CPU,
   1 torch thread each, ranks 0 and 1 of 2) on the same cores, each running the shared train step
   (raychat/train/step.py, TorchBackend, the demo's depth and micro-batches) fed by synthetic in-memory
   batches, by the plain iterator, or by the Ray Data stream (tokenizing in Ray Data tasks); time per
   optimizer step, ratio to synthetic (target <= 1.05). The demo's workers also average gradients
   (DeepSpeed over gloo); that cost is the same for every source and left out.

(1) turns the token cache off (`data.cache_mb=0`), so that every epoch is tokenized again: it measures the
chunked Ray Data path that corpora larger than the cache take. Packing is `concat` for (1) so that every
tokenized token is delivered (best-fit would drop the cropped tokens, which is a property of the data,
not of the stream). (2) reports wall time and the CPU time of each worker process per step: on a shared
machine only the latter is stable. Best of --repeats runs for every number.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402
import torch  # noqa: E402

EPOCHS = 6   # several epochs: start-up is reported apart, and epoch boundaries are crossed


@ray.remote(num_cpus=0.5)
class Consumer:
    """Stands in for a train worker: pulls batches from its rank's stream for EPOCHS epochs."""

    def __init__(self):
        import ray.data  # noqa: F401  (a train worker has these imported before its stream starts)

        import raychat.data.pretrain  # noqa: F401

    def run(self, cfg_dict, tokenizer, rank, world, use_ray):
        from raychat.config import Config
        from raychat.data.pretrain import PretrainStream
        cfg = Config.from_dict(cfg_dict)
        t0 = time.perf_counter()
        tokens = 0
        with PretrainStream(cfg, tokenizer, "train", cfg.pretrain.device_batch_size, cfg.pretrain.sequence_len,
                            rank=rank, world_size=world, use_ray=use_ray) as stream:
            inputs, _ = next(stream)
            t_first, first_tokens = time.perf_counter(), inputs.numel() + inputs.shape[0]
            while stream.state_dict()["epoch"] < EPOCHS:
                inputs, targets = next(stream)
                tokens += inputs.numel() + inputs.shape[0]   # rows of T+1 tokens
        return first_tokens + tokens, tokens, t0, t_first, time.perf_counter()


def stream_rate(cfg, tokenizer, use_ray: bool) -> tuple[float, float]:
    """(tokens/s from creating the streams to the end, seconds to the first batch (the slower consumer))."""
    consumers = [Consumer.remote() for _ in range(2)]
    ray.get([c.__ray_ready__.remote() for c in consumers])
    results = ray.get([c.run.remote(cfg.to_dict(), tokenizer, rank, 2, use_ray) for rank, c in enumerate(consumers)])
    for c in consumers:
        ray.kill(c)
    end = max(r[4] for r in results)
    overall = sum(r[0] for r in results) / (end - min(r[2] for r in results))
    first = max(r[3] - r[2] for r in results)
    return overall, first


def encode_rate(tokenizer, docs) -> float:
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(EPOCHS):
        tokens += sum(map(len, tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id())))
    return tokens / (time.perf_counter() - t0)


@ray.remote(num_cpus=0.5)
class Trainer:
    """Stands in for a demo train worker: 1 torch thread, the demo's model and micro-batches, this rank's data."""

    def step_time(self, cfg_dict, tokenizer, source: str, steps: int, rank: int, world: int) -> tuple[float, float]:
        """Mean (wall, CPU of this whole process) seconds per optimizer step (after 2 warm-up steps) with
        batches from `source`. The CPU time counts the stream's threads too (packing, Ray Data's executor)
        and does not depend on what else runs on a shared machine."""
        from raychat.config import Config
        from raychat.data.pretrain import PretrainStream
        from raychat.model import GPTConfig, build_model
        from raychat.train.backend import TorchBackend
        from raychat.train.base import plan_horizon
        from raychat.train.step import Schedule, train_step

        torch.set_num_threads(1)
        cfg = Config.from_dict(cfg_dict)
        tc = cfg.pretrain
        torch.manual_seed(0)
        model = build_model(GPTConfig(depth=tc.depth, vocab_size=tokenizer.get_vocab_size(),
                                      sequence_len=tc.max_seq_len), "cpu")
        backend = TorchBackend(model, tc, "cpu", "fp32")
        horizon = plan_horizon(tc, world)
        schedule = Schedule(steps + 2, tc.warmup_ratio, tc.warmdown_ratio, tc.final_lr_frac)
        stream = None
        if source == "synthetic":
            g = torch.Generator().manual_seed(rank)
            rows = [torch.randint(0, tokenizer.get_vocab_size(), (tc.device_batch_size, tc.sequence_len + 1),
                                  generator=g) for _ in range(horizon.grad_accum_steps)]
            batches = itertools.cycle([(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows])
        else:
            stream = PretrainStream(cfg, tokenizer, "train", tc.device_batch_size, tc.sequence_len, rank=rank,
                                    world_size=world, use_ray=source == "ray")
            batches = iter(stream)
        for step in range(2):
            train_step(backend, batches, step, schedule, horizon.grad_accum_steps)
        waited = stream.stats()["wait_s"] if stream is not None else 0.0
        t0, cpu0 = time.perf_counter(), time.process_time()
        for step in range(2, steps + 2):
            train_step(backend, batches, step, schedule, horizon.grad_accum_steps)
        seconds, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - cpu0) / steps
        if stream is not None:
            print(f"rank {rank} {source}: waited for data {1000 * (stream.stats()['wait_s'] - waited) / steps:.1f} "
                  f"ms/step", flush=True)
            stream.close()
        return seconds, cpu


def step_time(cfg, tokenizer, source: str, steps: int) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds per optimizer step of 2 workers training side by side."""
    trainers = [Trainer.remote() for _ in range(2)]
    times = ray.get([t.step_time.remote(cfg.to_dict(), tokenizer, source, steps, rank, 2)
                     for rank, t in enumerate(trainers)])
    for t in trainers:
        ray.kill(t)
    return sum(w for w, _ in times) / len(times), sum(c for _, c in times) / len(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run in part 2")
    parser.add_argument("--part", type=int, choices=(1, 2), default=None, help="run only part 1 or 2")
    args = parser.parse_args()
    if not os.environ.get("RAYCHAT_DATA_DIR"):
        sys.exit("set RAYCHAT_DATA_DIR to the offline datasets (shared/data)")
    os.environ["RAYCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="raychat_bench_data_")
    torch.set_num_threads(os.cpu_count() or 1)

    from raychat.common import init_ray
    from raychat.config import load_config
    from raychat.data.fineweb import iter_documents, shard_paths
    from raychat.tokenizer import RustBPETokenizer

    cfg = load_config("demo", ["data.packing=concat", "data.cache_mb=0"])
    docs = list(iter_documents(shard_paths(cfg, "train")))
    t0 = time.perf_counter()
    tokenizer = RustBPETokenizer.train_from_iterator((d[:10_000] for d in docs[:600]), cfg.tokenizer.vocab_size)
    print(f"{len(docs)} train documents, {sum(map(len, docs)) / 1e6:.1f} M chars; demo tokenizer "
          f"(vocab {tokenizer.get_vocab_size()}) trained in {time.perf_counter() - t0:.1f}s", flush=True)
    init_ray(num_cpus=4)

    # ---------------------------------------------------------------- 1. throughput
    raw, via_ray, plain = [], [], []
    for i in range(args.repeats if args.part != 2 else 0):
        raw.append(encode_rate(tokenizer, docs))
        via_ray.append(stream_rate(cfg, tokenizer, use_ray=True))
        plain.append(stream_rate(cfg, tokenizer, use_ray=False))
        print(f"repeat {i}: encode {raw[-1]:,.0f} tok/s | Ray Data stream -> 2 consumers {via_ray[-1][0]:,.0f} "
              f"tok/s (first batch {via_ray[-1][1]:.2f}s) | plain iterator -> 2 consumers {plain[-1][0]:,.0f} "
              f"tok/s (first batch {plain[-1][1]:.2f}s)", flush=True)
    best_raw = max(raw) if raw else None
    if best_raw:
        print(f"\n== 1. throughput: {EPOCHS} epochs of the train shards ({cfg.data.packing}), 2 consumers, "
              f"best of {args.repeats}")
        print(f"raw tiktoken encode, 1 process:  {best_raw:12,.0f} tok/s")
        for name, rates in (("Ray Data stream", via_ray), ("plain iterator ", plain)):
            overall, first = max(r[0] for r in rates), min(r[1] for r in rates)
            print(f"{name}, 2 consumers: {overall:12,.0f} tok/s, start-up included   ratio {overall / best_raw:.2f}"
                  f"   (first batch after {first:.2f}s)")
    ray.shutdown()
    if args.part == 1:
        return 0
    init_ray(num_cpus=4)   # a fresh Ray: part 1's actors and worker pool must not weigh on part 2

    # ---------------------------------------------------------------- 2. step time
    cfg = load_config("demo")   # the demo's own data settings (packing, cache, tasks, buffer)
    tc = cfg.pretrain
    print(f"\n== 2. step time in the demo configuration: 2 workers x 1 thread, depth {tc.depth}, "
          f"{tc.device_batch_size}x{tc.sequence_len} micro-batches, {tc.total_batch_size} tokens/step, "
          f"packing {cfg.data.packing}, best of {args.repeats} x {args.steps} steps", flush=True)
    times = {"synthetic": [], "plain": [], "ray": []}
    for i in range(args.repeats):   # interleaved: a busy spell on a shared machine hits every source
        for source in times:
            times[source].append(step_time(cfg, tokenizer, source, args.steps))
        print(f"repeat {i}: " + " | ".join(f"{k} {v[-1][0] * 1000:.1f} ms/step (CPU {v[-1][1] * 1000:.1f} ms)"
                                           for k, v in times.items()), flush=True)
    for index, what in ((0, "wall"), (1, "process CPU")):
        best = {k: min(t[index] for t in v) for k, v in times.items()}
        print(f"{what:11s}: synthetic {best['synthetic'] * 1000:7.1f} ms/step | real stream (plain) "
              f"{best['plain'] * 1000:7.1f} ms/step, ratio {best['plain'] / best['synthetic']:.3f} | real stream "
              f"(Ray Data) {best['ray'] * 1000:7.1f} ms/step, ratio {best['ray'] / best['synthetic']:.3f}"
              f"  (target <= 1.05)", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
