"""RL benchmark (CPU): rollout throughput with 1 and 2 actors, and the cost of a weight sync.

    flock /tmp/raychat_cpu.lock .venv/bin/python bench/rl.py [--repeats 2] [--sync-depth 20]

1. Rollouts: a depth-4 random model (the demo tokenizer trained on the offline shards, vocab 4,096)
   samples 4 replies of 64 tokens to each of 16 GSM8K questions through the model pool (raychat/pool.py)
   with 1 and then 2 rollout actors; prints reply tokens/s and the 2-actor / 1-actor ratio (2 cores: the
   most it can be is ~2x).
2. Weight sync: the weights of a depth-`--sync-depth` GPT (d20 = 561 M parameters, fp32) published to one
   rollout actor as RL does it (raychat/rl/weight_sync.py), both ways: through the object store (one
   `ray.put`, the actor fetches and loads it) and by a gloo broadcast straight into the actor's
   parameters. Prints seconds for each (the issue's target for d20 is < 1 s, over NCCL on GPUs) and the
   baseline beside them: a plain in-process `load_state_dict` of the same tensors, a copy no sync avoids.
3. Step time, `rl.max_staleness` 0 vs 1: `raychat train rl` on Ray Train (2 learner workers, 2 rollout
   actors, a depth-2 random "SFT" model, the toy task, 8 questions x 4 replies of 32 tokens per step,
   12 steps); per step: wall time, the learner's waiting for rollouts, the weight sync. Prints the
   stale / on-policy step-time ratio (< 1: generation overlapped with learning).
Best of --repeats runs each (parts 1-2). Needs RAYCHAT_DATA_DIR (the offline shards and GSM8K).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def demo_tokenizer():
    from raychat.common import get_data_dir
    from raychat.data.fineweb import iter_documents
    from raychat.tokenizer import RustBPETokenizer
    shards = sorted((get_data_dir() / "pretrain" / "shards").glob("*.parquet"))[:1]

    def texts(budget=2_000_000):
        for text in iter_documents(shards, doc_cap=10_000):
            yield text
            budget -= len(text)
            if budget <= 0:
                return
    return RustBPETokenizer.train_from_iterator(texts(), 4096)


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out


def rollout_throughput(tokenizer, repeats: int) -> None:
    from raychat.model import GPTConfig, build_model
    from raychat.pool import ModelPool
    from raychat.rl.rollout import RolloutWorker
    from raychat.rl.tasks import build_rl_task
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=4, vocab_size=tokenizer.get_vocab_size(), sequence_len=512))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    task = build_rl_task("gsm8k", "test")
    chunks = [{"questions": [{"index": i, "prompt": tokenizer.render_for_completion(task.question(i)),
                              "conversation": task.question(i)}],
               "num_samples": 4, "max_tokens": 64, "temperature": 1.0, "top_k": 50, "seed": 1, "min_version": 0}
              for i in range(16)]
    rates = {}
    for actors in (1, 2):
        with ModelPool(RolloutWorker, model.eval(), tokenizer, actors, False, "gsm8k") as pool:
            pool.call_all("ping")   # every actor has loaded its model before the clock starts
            pool.map("rollout", chunks[:actors])   # warm-up
            seconds, results = best(lambda: pool.map("rollout", chunks), repeats)
        tokens = sum(r["tokens"] for r in results)
        rates[actors] = tokens / seconds
        print(f"rollouts, {actors} actor(s): {tokens} reply tokens in {seconds:.2f} s = {rates[actors]:,.0f} tok/s")
    print(f"rollout scaling 2 actors / 1 actor: {rates[2] / rates[1]:.2f}x")


def weight_sync(tokenizer, depth: int, repeats: int) -> None:
    import tempfile
    from pathlib import Path

    from raychat.model import GPTConfig, build_model
    from raychat.pool import ModelPool
    from raychat.rl.rollout import RolloutWorker
    from raychat.rl.weight_sync import WeightPublisher
    learner = build_model(GPTConfig(depth=depth, vocab_size=65536), init=False)
    state = {k: v.detach() for k, v in learner.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    copy = build_model(GPTConfig(depth=depth, vocab_size=65536), init=False)
    baseline, _ = best(lambda: copy.load_state_dict(state), repeats)
    del copy
    times = {}
    with ModelPool(RolloutWorker, learner, tokenizer, 1, False, "gsm8k") as pool:
        for method in ("object_store", "broadcast"):
            publisher = WeightPublisher(method, pool, Path(tempfile.mkdtemp(prefix="raychat_sync_")), "cpu")
            publisher.publish(learner, 1)   # warm-up: the actor's first load; the broadcast forms its group
            runs = [publisher.publish(learner, version) for version in range(2, 2 + repeats)]
            assert all(r["sync_fallbacks"] == 0 for r in runs)
            times[method] = min(r["sync_s"] for r in runs)
            publisher.close()
    print(f"weight sync d{depth} ({sum(v.numel() for v in state.values()) / 1e6:.0f} M params, {size / 2**30:.2f} GiB "
          f"fp32) to 1 rollout actor: object store (put, fetch, load) {times['object_store']:.2f} s; gloo broadcast "
          f"into the actor's parameters {times['broadcast']:.2f} s; in-process load_state_dict {baseline:.2f} s; "
          f"broadcast / object store {times['broadcast'] / times['object_store']:.2f}x, broadcast / copy "
          f"{times['broadcast'] / baseline:.1f}x")


def step_split(tokenizer) -> None:
    """Part 3 (see the module docstring), in a temporary RAYCHAT_BASE_DIR."""
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raychat.checkpoint import save_model
    from raychat.config import load_config
    from raychat.model import GPTConfig, build_model
    from raychat.train.launch import train_main
    base = Path(tempfile.mkdtemp(prefix="raychat_bench_rl_"))
    os.environ["RAYCHAT_BASE_DIR"] = str(base)
    tokenizer.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=256))
    save_model(base / "checkpoints" / "sft" / "default" / "step_000000", model,
               {"step": 0, "tokenizer_fingerprint": tokenizer.fingerprint()})
    steps, results = 12, {}
    for staleness in (0, 1):
        run = f"stale{staleness}"
        cfg = load_config("demo", [f"run.name={run}", "rl.parent_run=default", "rl.task=fixed:the",
                                   "rl.examples_per_step=8", "rl.num_samples=4", "rl.max_new_tokens=32",
                                   "rl.device_batch_size=8", f"rl.num_iterations={steps}", "rl.save_every=0",
                                   "rl.eval_problems=1", "rl.eval_samples=1", f"rl.max_staleness={staleness}"])
        train_main(cfg, SimpleNamespace(subcommand="rl"))
        events = EventAccumulator(str(base / "tb" / "rl" / run))
        events.Reload()

        def mean(tag, skip=2):  # the first steps include start-up
            values = [e.value for e in events.Scalars(tag)][skip:]
            return sum(values) / len(values)
        # train/step_seconds: the loop's running mean of the step (waiting for rollouts + update), without the
        # weight sync that follows it
        step, wait, sync = mean("train/step_seconds", skip=steps - 1), mean("rl/rollout_wait_s"), mean("rl/sync_s")
        results[staleness] = (step + sync, wait, sync)
        print(f"max_staleness {staleness}: {step + sync:.2f} s/step = waiting for rollouts {wait:.2f} s + update "
              f"{step - wait:.2f} s + weight sync {sync:.2f} s")
    print(f"step time, max_staleness 1 / 0: {results[1][0] / results[0][0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sync-depth", type=int, default=20)
    args = parser.parse_args()
    from raychat.common import init_ray
    init_ray(num_cpus=4, object_store_memory=6 * 2**30)
    torch.set_num_threads(1)
    tokenizer = demo_tokenizer()
    rollout_throughput(tokenizer, args.repeats)
    weight_sync(tokenizer, args.sync_depth, args.repeats)
    step_split(tokenizer)


if __name__ == "__main__":
    main()
