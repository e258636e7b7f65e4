"""A tiny GPT for model and engine tests."""
import torch

from raychat.model import GPT, GPTConfig, build_model


def random_model(depth=2, vocab_size=128, sequence_len=64, n_kv_head=None, seed=0) -> GPT:
    """A tiny model whose zero-initialised matrices are randomised too (nanochat's init zeroes the head and
    the output projections: all logits would tie), so its outputs depend on everything."""
    torch.manual_seed(seed)
    model = build_model(GPTConfig(depth=depth, vocab_size=vocab_size, sequence_len=sequence_len, n_kv_head=n_kv_head))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()
