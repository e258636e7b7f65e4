"""GPT: exact size and FLOPs of the reference model, shapes, causality, losses, KV-cache attention."""
import math

import pytest
import torch

from raychat.model import GPT, GPTConfig, Linear, build_model

from modelkit import random_model


def test_d20_size_and_flops_match_nanochat():
    with torch.device("meta"):
        model = GPT(GPTConfig(depth=20, vocab_size=65536))
    assert model.num_params() == 560_988_160
    assert model.transformer.wte.weight.numel() == 83_886_080
    assert sum(p.numel() for p in model.transformer.h[0].parameters()) == 19_660_800
    assert model.estimate_flops() == 3_491_758_080
    assert f"{model.estimate_flops():.4e}" == "3.4918e+09"


def test_config_derivation_and_validation():
    c = GPTConfig(depth=20, vocab_size=65536)
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.n_kv_head) == (20, 1280, 10, 128, 10)
    tiny = GPTConfig(depth=1, vocab_size=100)
    assert (tiny.n_embd, tiny.n_head, tiny.head_dim) == (64, 1, 64)
    assert GPTConfig.from_dict(GPTConfig(depth=4, vocab_size=10, n_kv_head=1).to_dict()) == \
        GPTConfig(depth=4, vocab_size=10, n_kv_head=1)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(depth=4, vocab_size=100, n_kv_head=3)
    with pytest.raises(ValueError, match="depth"):
        GPTConfig(depth=0, vocab_size=100)


def test_parameter_names_and_init():
    model = build_model(GPTConfig(depth=2, vocab_size=64, sequence_len=32))
    names = dict(model.named_parameters())
    assert "transformer.wte.weight" in names and "lm_head.weight" in names
    assert "transformer.h.1.attn.c_q.weight" in names and "transformer.h.1.mlp.c_fc.weight" in names
    # output projections and the head start at zero: the initial loss is exactly ln(vocab)
    assert names["transformer.h.0.attn.c_proj.weight"].abs().sum() == 0
    assert names["lm_head.weight"].abs().sum() == 0
    idx = torch.randint(0, 64, (2, 16))
    loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(64), abs=1e-5)
    assert names["transformer.wte.weight"].std().item() == pytest.approx(1.0, abs=0.1)


def test_forward_shapes_losses_and_ignore_index():
    model = random_model()
    idx = torch.randint(0, 128, (3, 20))
    targets = torch.randint(0, 128, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 128) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-cap
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 20)
    assert model(idx, targets).item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    targets[:, :10] = -1
    masked = model(idx, targets, loss_reduction="none")
    assert (masked[:, :10] == 0).all()
    assert model(idx, targets).item() == pytest.approx(masked[:, 10:].mean().item(), rel=1e-5)
    assert torch.allclose(model(idx, last_only=True)[:, 0], logits[:, -1], atol=1e-6)


def test_attention_is_causal():
    model = random_model()
    a = torch.randint(0, 128, (1, 24))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % 128
    la, lb = model(a), model(b)
    assert torch.allclose(la[0, :12], lb[0, :12], atol=1e-6)
    assert not torch.allclose(la[0, 12:], lb[0, 12:], atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_kv_cache_matches_full_forward_with_rows_at_different_positions(n_kv_head):
    """Prefill rows separately to different lengths, then feed chunks to all rows at once: each row's
    logits equal a full forward over that row's sequence (masking and per-row rotary positions)."""
    model = random_model(depth=4, n_kv_head=n_kv_head)  # 2 heads; n_kv_head=1 is grouped-query attention
    torch.manual_seed(1)
    seqs = [torch.randint(0, 128, (1, n)) for n in (5, 9, 2)]
    chunk = torch.randint(0, 128, (3, 3))
    cache = model.new_kv_cache(batch_size=3, max_seq_len=16)
    with torch.no_grad():
        for row, seq in enumerate(seqs):
            model(seq, kv_cache=cache.select(row, row + 1))
        got = model(chunk, kv_cache=cache.select(0, 3))
        for row, seq in enumerate(seqs):
            full = model(torch.cat([seq, chunk[row:row + 1]], dim=1))[0, -3:]
            assert torch.allclose(got[row], full, rtol=1e-5, atol=1e-4), row
    assert cache.lengths == [8, 12, 5]
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(3, 5, dtype=torch.long), kv_cache=cache.select(0, 3))


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with 1 thread (conftest); the CPU decode path needs 2+
    yield
    torch.set_num_threads(old)


def test_linear_cpu_decode_path_equals_f_linear(two_threads):
    torch.manual_seed(0)
    linear = Linear(64, 96)
    torch.nn.init.normal_(linear.weight)
    for shape in [(1, 1, 64), (3, 2, 64), (8, 64), (2, 9, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got = linear(x)
        assert got.shape == (*shape[:-1], 96)
        assert torch.allclose(got, torch.nn.functional.linear(x, linear.weight), atol=1e-5), shape
    x = torch.randn(1, 64, requires_grad=True)  # with autograd: the ordinary path, gradients flow
    linear(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
