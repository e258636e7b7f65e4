"""Chat service throughput and time to first token with 1, 8 and 32 concurrent streaming clients.

One Serve replica on this machine serves a randomly initialised model (real architecture, real tokenizer,
real checkpoint files) over 127.0.0.1. Each client posts streaming chat completions back to back for
`--duration` seconds (closed loop); generated tokens are counted from each response's `usage`.
The baseline is 1 client in the same run: with continuous batching, 8 clients should get well over
4x its tokens/s, because one forward pass advances all of them.

    flock /tmp/raychat_cpu.lock .venv/bin/python bench/serve.py            # ~4 minutes
    flock /tmp/raychat_cpu.lock .venv/bin/python bench/serve.py --depth 4 --reps 3   # a serving-bound model

Needs RAYCHAT_DATA_DIR (the tokenizer is trained on the offline shards). Results: bench/results/serve.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# `python bench/serve.py` puts bench/ first on sys.path, where this file would shadow the `serve` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def build_checkpoint(base: Path, depth: int, vocab_size: int, sequence_len: int) -> None:
    """Tokenizer trained on ~2 M characters of the offline shards + a random model saved as an sft checkpoint."""
    import pyarrow.parquet as pq
    import torch

    from raychat.checkpoint import save_model
    from raychat.common import get_data_dir
    from raychat.model import GPTConfig, build_model
    from raychat.tokenizer import RustBPETokenizer

    shards = sorted(((get_data_dir("pretrain") or Path("/nonexistent")) / "shards").glob("*.parquet"))
    if not shards:
        sys.exit("bench/serve.py needs RAYCHAT_DATA_DIR with pretrain/shards (the offline datasets)")

    def texts(budget=2_000_000):
        for text in pq.read_table(shards[0], columns=["text"]).column("text").to_pylist():
            yield text[:10_000]
            budget -= min(len(text), 10_000)
            if budget <= 0:
                return

    tokenizer = RustBPETokenizer.train_from_iterator(texts(), vocab_size)
    tokenizer.save(base / "tokenizer")
    model = build_model(GPTConfig(depth=depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nanochat's init zeroes the output projections; give the model a real forward pass
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    save_model(base / "checkpoints" / "sft" / "default" / "step_000000", model,
               {"step": 0, "tokenizer_fingerprint": tokenizer.fingerprint()})
    print(f"model: depth {depth}, {model.num_params() / 1e6:.1f} M parameters, vocab {tokenizer.get_vocab_size()}")


async def one_client(client: httpx.AsyncClient, index: int, stop_at: float, max_tokens: int, out: dict) -> None:
    n = 0
    while time.perf_counter() < stop_at:
        body = {"messages": [{"role": "user", "content": f"Client {index} asks question {n}: why is the sky blue?"}],
                "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                "temperature": 1.0, "seed": index * 100_000 + n}
        n += 1
        sent = time.perf_counter()
        first = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                out["errors"] += 1
                await response.aread()
                continue
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and "role" not in chunk["choices"][0]["delta"]:
                    first = time.perf_counter() - sent  # the first chunk after the role-only opener
                if chunk.get("usage"):
                    out["tokens"] += chunk["usage"]["completion_tokens"]
        out["requests"] += 1
        if first is not None:
            out["ttft"].append(first)


async def measure(url: str, concurrency: int, duration: float, max_tokens: int) -> dict:
    out = {"tokens": 0, "requests": 0, "errors": 0, "ttft": []}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[one_client(client, i, start + duration, max_tokens, out) for i in range(concurrency)])
        wall = time.perf_counter() - start  # includes finishing the requests in flight at the deadline
    ttft = sorted(out["ttft"])
    return {"concurrency": concurrency, "tokens_per_s": out["tokens"] / wall, "requests": out["requests"],
            "errors": out["errors"], "wall_s": wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=10, help="10: 54 M parameters, ~20 ms per token on 1 core")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--reps", type=int, default=2, help="measurements per concurrency; the best is kept")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from raychat.common import LOCAL_RAY_ENV
    for key, value in LOCAL_RAY_ENV.items():  # Ray on 127.0.0.1, set before Ray is imported
        os.environ.setdefault(key, value)
    base = Path(tempfile.mkdtemp(prefix="raychat_bench_serve_"))
    os.environ["RAYCHAT_BASE_DIR"] = str(base)
    build_checkpoint(base, args.depth, args.vocab, sequence_len=max(256, 2 * args.max_tokens + 128))

    from ray import serve

    from raychat.common import init_ray
    from serve.app import build_app
    init_ray(num_cpus=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"preset": "demo", "source": "sft", "set": [
        f"serve.max_batch_size={max(levels)}", f"serve.max_queued={max(levels)}", "serve.cpus_per_replica=1"]}),
        name="raychat", route_prefix="/")
    try:
        asyncio.run(measure(url, 8, 3.0, args.max_tokens))  # warm-up: worker threads, allocator, KV cache growth
        results = []
        for concurrency in levels:
            runs = []
            for _ in range(args.reps):
                before = httpx.get(f"{url}/stats").json()
                run = asyncio.run(measure(url, concurrency, args.duration, args.max_tokens))
                after = httpx.get(f"{url}/stats").json()
                # where the replica's time went: decode steps, prefills, or waiting (serving overhead)
                steps = after["decode_steps_total"] - before["decode_steps_total"]
                decode = after["decode_s_total"] - before["decode_s_total"]
                prefill = after["prefill_s_total"] - before["prefill_s_total"]
                run.update(step_ms=1000 * decode / max(1, steps), decode_share=decode / run["wall_s"],
                           prefill_share=prefill / run["wall_s"], tokens_per_step=run["tokens_per_s"] * run["wall_s"] / max(1, steps))
                runs.append(run)
            best = max(runs, key=lambda r: r["tokens_per_s"])
            best["all_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in runs]
            results.append(best)
            print(f"  {concurrency:>3} clients: {best['tokens_per_s']:8.1f} tok/s (runs {best['all_tokens_per_s']})",
                  flush=True)
        stats = httpx.get(f"{url}/stats").json()
    finally:
        serve.shutdown()

    baseline = results[0]["tokens_per_s"]
    print(f"\nServe chat service, one replica, depth {args.depth}, {args.max_tokens} tokens/request, "
          f"best of {args.reps} x {args.duration:.0f} s, client on the same machine")
    print("| clients | tokens/s | ratio vs 1 client | TTFT p50 ms | TTFT p99 ms | requests | errors "
          "| ms/step | tokens/step | replica time in decode / prefill |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        r["ratio"] = r["tokens_per_s"] / baseline
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['requests']} | {r['errors']} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_step']:.1f} | {100 * r['decode_share']:.0f} % / {100 * r['prefill_share']:.0f} % |")
    print(f"peak sequences decoded together: {stats['peak_active_sequences']}")
    out = REPO / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "stats": stats}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
