"""Model training-step benchmark (CPU, fp32): tokens/s of one full optimizer step.

    flock /tmp/raychat_cpu.lock .venv/bin/python bench/model.py [--repeats 3]

For depth 4 (seq 512, batch 8) and depth 8 (seq 512, batch 4), vocab 8,192, it times three things on
the same model and batch, best of --repeats steps each after a warm-up step:
  * step:    forward + backward + AdamW (embedding, lm_head) + Muon (matrices), raychat's optimizer;
  * adamw:   the same step with plain AdamW for every parameter (the usual optimizer: the baseline);
  * fwd+bwd: forward + backward only (so the optimizer's share of a step is visible).
and prints tokens/s, the achieved GFLOP/s from the model's own FLOPs/token, and the ratios.
"""
from __future__ import annotations

import argparse
import time

import torch

from raychat.model import GPTConfig, build_model
from raychat.optim import build_adamw, build_optimizers

CASES = [dict(depth=4, seq=512, batch=8), dict(depth=8, seq=512, batch=4)]
VOCAB = 8192


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, optimizer state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_case(depth: int, seq: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=depth, vocab_size=VOCAB, sequence_len=seq))
    x = torch.randint(0, VOCAB, (batch, seq))
    y = torch.randint(0, VOCAB, (batch, seq))

    def forward_backward():
        model(x, y).backward()

    def with_optimizers(optimizers):
        def step():
            forward_backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        return step

    results = {}
    results["fwd+bwd"] = best_time(lambda: (forward_backward(), model.zero_grad(set_to_none=True)), repeats)
    results["step"] = best_time(with_optimizers(build_optimizers(model)), repeats)
    adamw = build_adamw([{"params": list(model.parameters()), "lr": 1e-4}])   # the baseline: AdamW for everything
    results["adamw"] = best_time(with_optimizers([adamw]), repeats)
    tokens = batch * seq
    return {"tokens": tokens, "flops_per_token": model.estimate_flops(), "params": model.num_params(), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, vocab {VOCAB}, best of {args.repeats}")
    print(f"{'case':<24}{'params':>10}{'step tok/s':>12}{'GFLOP/s':>9}{'adamw tok/s':>13}{'fwd+bwd tok/s':>15}"
          f"{'step/adamw':>12}{'optim share':>13}")
    for case in CASES:
        r = bench_case(case["depth"], case["seq"], case["batch"], args.repeats)
        name = f"d{case['depth']} seq{case['seq']} batch{case['batch']}"
        step_tps = r["tokens"] / r["step"]
        print(f"{name:<24}{r['params'] / 1e6:>9.1f}M{step_tps:>12,.0f}{step_tps * r['flops_per_token'] / 1e9:>9.1f}"
              f"{r['tokens'] / r['adamw']:>13,.0f}{r['tokens'] / r['fwd+bwd']:>15,.0f}"
              f"{r['adamw'] / r['step']:>12.3f}{1 - r['fwd+bwd'] / r['step']:>13.1%}", flush=True)


if __name__ == "__main__":
    main()
