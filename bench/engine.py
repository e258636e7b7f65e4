"""Engine decode benchmark (CPU, fp32): the KV cache vs recomputing the whole sequence for every token.

    flock /tmp/raychat_cpu.lock .venv/bin/python bench/engine.py [--repeats 2]

A depth-4 model (vocab 8,192), a 64-token prompt, 128 new tokens, greedy, for 1 and 8 samples:
  * cache:  `Engine.generate` (prompt prefilled once, then one token per row per forward pass);
  * full:   the baseline, no cache: every new token runs the full (rows, prompt + generated) sequence.
Both produce the same tokens (checked). Prints generated tokens/s (rows x new tokens / time) and the
speed-up; the target is >= 5x at 128 new tokens. Also prints continuous batching: 8 different prompts
through `generate_many` vs one at a time. Best of --repeats runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from raychat.engine import Engine
from raychat.model import GPTConfig, build_model

DEPTH, VOCAB, PROMPT, NEW = 4, 8192, 64, 128


def random_model():
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=DEPTH, vocab_size=VOCAB, sequence_len=512))
    with torch.no_grad():  # nanochat's init zeroes these; random values make greedy decoding non-trivial
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def with_cache(engine, prompt, rows):
    columns = [col for col, _ in engine.generate(prompt, num_samples=rows, max_tokens=NEW, temperature=0.0)]
    return [list(prompt) + [col[i] for col in columns] for i in range(rows)]


@torch.inference_mode()
def full_recomputation(model, prompt, rows):
    ids = torch.tensor([prompt] * rows)
    for _ in range(NEW):
        next_ids = model(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = random_model()
    engine = Engine(model)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, depth {DEPTH}, vocab {VOCAB}, "
          f"prompt {PROMPT}, {NEW} new tokens, greedy, best of {args.repeats}")
    print(f"{'rows':>5}{'cache tok/s':>13}{'full tok/s':>12}{'speed-up':>10}  same tokens")
    for rows in (1, 8):
        t_cache, out_cache = timed(lambda: with_cache(engine, prompt, rows), args.repeats)
        t_full, out_full = timed(lambda: full_recomputation(model, prompt, rows), args.repeats)
        tokens = rows * NEW
        print(f"{rows:>5}{tokens / t_cache:>13,.0f}{tokens / t_full:>12,.0f}{t_full / t_cache:>9.1f}x  "
              f"{out_cache == out_full}", flush=True)

    # continuous batching: 8 different prompts (lengths 16..128) together vs one after another
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (16 * (i + 1),), generator=g).tolist() for i in range(8)]
    t_many, many = timed(lambda: engine.generate_many(prompts, max_tokens=NEW, temperature=0.0), args.repeats)
    t_one, one = timed(lambda: [engine.generate_batch(p, max_tokens=NEW, temperature=0.0)[0][0] for p in prompts],
                       args.repeats)
    tokens = len(prompts) * NEW
    print(f"8 different prompts: generate_many {tokens / t_many:,.0f} tok/s, one at a time {tokens / t_one:,.0f} tok/s, "
          f"speed-up {t_one / t_many:.1f}x, same tokens {many[0] == one}")


if __name__ == "__main__":
    main()
