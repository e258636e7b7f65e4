"""Peak training memory of one GPU worker, estimated on CPU: what a d20 micro-batch keeps for backward,
plus the weights, gradients and optimizer states.

    .venv/bin/python bench/memory.py [--depth 20] [--rows 32] [--seq-len 2048] [--workers 8]

Activations: one forward pass of the real model at a short sequence under bf16 autocast (eager, as the
step runs without torch.compile), counting the bytes of every tensor autograd saves for backward
(`saved_tensors_hooks`, each storage once), split into the blocks (per token per layer) and the loss.
These scale linearly with the tokens of a micro-batch (SDPA keeps no T x T matrix), so they are
extrapolated to rows x seq_len. torch.compile usually saves less (it recomputes element-wise work),
so this is an upper bound for the compiled step. States: fp32 weights and gradients, the bf16 weight
copies autocast caches during a step, Muon momentum (fp32, every matrix), AdamW moments and ZeRO's
fp32 copy of the embedding and lm_head (divided by the workers under ZeRO-1/2).
"""
from __future__ import annotations

import argparse

import torch

from raychat.model import LOSS_CHUNK_ELEMENTS, GPTConfig, build_model

GIB = 2**30


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--rows", type=int, default=32, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=8, help="ZeRO shards the AdamW state over them")
    parser.add_argument("--probe-tokens", type=int, default=256, help="sequence length of the CPU probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=args.depth, vocab_size=args.vocab, sequence_len=args.seq_len))
    probes = {}
    for T in (args.probe_tokens // 2, args.probe_tokens):
        idx = torch.randint(0, args.vocab, (1, T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probes[T] = (saved_bytes(lambda: model.hidden_states(idx)), saved_bytes(lambda: model(idx, idx)))
    (t1, (trunk1, total1)), (t2, (trunk2, total2)) = probes.items()
    # the difference of two lengths removes what does not grow with tokens (saved bf16 weight copies)
    per_token_layer = (trunk2 - trunk1) / (t2 - t1) / args.depth
    loss_per_token = ((total2 - trunk2) - (total1 - trunk1)) / (t2 - t1)
    tokens = args.rows * args.seq_len
    d, V = model.config.n_embd, args.vocab
    loss_kept = loss_per_token * tokens + 4 * model.lm_head.weight.numel()   # gradients kept for backward
    loss_transient = 3 * 4 * min(tokens, max(1, LOSS_CHUNK_ELEMENTS // V)) * V   # one chunk: logits, fp32 work, gradient
    matrices = sum(p.numel() for p in model.transformer.h.parameters())
    embed_head = model.transformer.wte.weight.numel() + model.lm_head.weight.numel()
    states = {
        "weights (fp32)": 4 * (matrices + embed_head),
        "gradients (fp32)": 4 * (matrices + embed_head),
        "bf16 weight copies (autocast cache)": 2 * (matrices + model.lm_head.weight.numel()),
        "Muon momentum (fp32)": 4 * matrices,
        "AdamW moments + ZeRO fp32 copy (sharded)": 12 * embed_head / args.workers,
    }
    rows = [("activations: blocks", per_token_layer * args.depth * tokens),
            ("activations: loss (gradients kept for backward)", loss_kept),
            ("loss: one chunk of logits at a time", loss_transient), *states.items()]
    print(f"d{args.depth}: {model.num_params():,} parameters, micro-batch {args.rows} x {args.seq_len} = {tokens:,} tokens, "
          f"{args.workers} workers")
    print(f"saved for backward per token per layer: {per_token_layer:,.0f} bytes ({per_token_layer / d:.1f} x n_embd)")
    for name, value in rows:
        print(f"  {name:48s} {value / GIB:7.1f} GiB")
    print(f"  {'estimated peak (eager upper bound)':48s} {sum(v for _, v in rows) / GIB:7.1f} GiB")


if __name__ == "__main__":
    main()
