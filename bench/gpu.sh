#!/usr/bin/env bash
# GPU check, one CUDA GPU, no Ray: d20 training-step MFU (bf16 autocast, torch.compile, device batch 32,
# sequence 2048, the real Muon + AdamW step) and KV-cache decode tokens/s of the engine. Prints one JSON line.
#
#   bash bench/gpu.sh            # from the repository root, with a Python that has torch (CUDA) installed
#
# Target: MFU >= 50% on an H100/H200 (989 TFLOP/s bf16 dense). Needs ~80 GB of GPU memory at batch 32.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$@" <<'PY'
import json, sys, time
import torch

from raychat.config import load_config
from raychat.engine import Engine
from raychat.model import GPTConfig, build_model
from raychat.train.backend import TorchBackend
from raychat.train.loop import device_peak_flops
from raychat.train.step import Schedule, train_step

assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
torch.manual_seed(0)
torch.set_float32_matmul_precision("high")
device, B, T, V = "cuda", 32, 2048, 65536
cfg = load_config("d20").pretrain
model = build_model(GPTConfig(depth=20, vocab_size=V, sequence_len=T), device)
backend = TorchBackend(model, cfg, device, "bf16")
model.forward = torch.compile(model.forward)   # as the trainers do on GPU
accum = cfg.total_batch_size // (B * T)        # 8 micro-batches per 524,288-token step on one GPU

def batches():
    g = torch.Generator(device=device).manual_seed(1)
    while True:
        x = torch.randint(0, V, (B, T + 1), device=device, generator=g)
        yield x[:, :-1], x[:, 1:]

it, schedule = batches(), Schedule(1000)
for step in range(3):                           # compile + warm-up
    train_step(backend, it, step, schedule, accum)
torch.cuda.synchronize()
t0, steps = time.perf_counter(), 5
for step in range(3, 3 + steps):
    train_step(backend, it, step, schedule, accum)
torch.cuda.synchronize()
step_s = (time.perf_counter() - t0) / steps
tokens_per_s = cfg.total_batch_size / step_s
peak = device_peak_flops(device) or 989e12
mfu = model.estimate_flops() * tokens_per_s / peak
train_mem = torch.cuda.max_memory_allocated() / 2**30

del model.forward          # back to the eager forward: decoding shapes change every step
model.eval()
engine = Engine(model)
decode = {}
for samples in (1, 8):
    prompt = torch.randint(0, V, (64,)).tolist()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        list(engine.generate(prompt, num_samples=samples, max_tokens=8, temperature=1.0))   # warm-up
        torch.cuda.synchronize(); t = time.perf_counter()
        n = sum(1 for _ in engine.generate(prompt, num_samples=samples, max_tokens=128, temperature=1.0))
        torch.cuda.synchronize()
    decode[f"decode_tok_s_{samples}"] = round(n * samples / (time.perf_counter() - t), 1)

print(json.dumps({"device": torch.cuda.get_device_name(), "params": model.num_params(),
                  "flops_per_token": model.estimate_flops(), "device_batch": B, "seq_len": T,
                  "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 4),
                  "train_peak_mem_gib": round(train_mem, 1), **decode}))
PY
