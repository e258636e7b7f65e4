"""A tiny model for the serving tests: real architecture, random weights that make the output depend on
the prompt (nanochat's init zeroes the output projections, which would make every answer the same)."""
import torch

from raychat.model import GPTConfig, build_model


def tiny_model(tokenizer, depth: int = 2, sequence_len: int = 256, seed: int = 0):
    model = build_model(GPTConfig(depth=depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()
