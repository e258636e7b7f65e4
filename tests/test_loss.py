"""The training loss: the chunked lm_head cross-entropy against the textbook one, and the step's
normalisation over micro-batches (gradient accumulation = one big batch; all-masked micro-batches add
nothing; a step without supervised tokens changes nothing)."""
import math

import pytest
import torch
import torch.nn.functional as F

from raychat.config import load_config
from raychat.model import LOGIT_SOFTCAP, chunk_loss_and_grad, head_loss
from raychat.train.backend import TorchBackend
from raychat.train.step import Batch, Schedule, train_step

from modelkit import random_model


def _reference(x, weight, targets, weights=None):
    """Textbook: materialise all logits, soft-cap, cross-entropy, optional per-token weights, sum."""
    capped = LOGIT_SOFTCAP * torch.tanh((x @ weight.t()) / LOGIT_SOFTCAP)   # fp32 or fp64, as given
    losses = F.cross_entropy(capped.view(-1, capped.size(-1)), targets.view(-1), ignore_index=-1, reduction="none")
    if weights is not None:
        losses = losses * weights.view(-1)
    return losses.sum()


def _case(seed=0, B=3, T=7, C=16, V=50):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64).requires_grad_()   # float64: exact comparisons
    w = (torch.randn(V, C, generator=g, dtype=torch.float64) * 2).requires_grad_()   # large logits: the soft-cap matters
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = -1
    targets[2] = -1
    return x, w, targets, torch.randn(B, T, generator=g)


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_loss_and_gradients_equal_the_textbook_ones(chunk_rows, weighted):
    x, w, targets, weights = _case()
    weights = weights if weighted else None
    ref = _reference(x, w, targets, weights)
    gx_ref, gw_ref = torch.autograd.grad(ref * 0.37, (x, w))
    loss = head_loss(x, w, targets, weights, "sum", chunk_rows=chunk_rows)
    gx, gw = torch.autograd.grad(loss * 0.37, (x, w))   # backward scales the stored gradients
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)
    assert gx[2].abs().max() == 0 and gx[0, :4].abs().max() == 0   # no target, no gradient


def test_reductions_without_gradients_and_the_mean():
    x, w, targets, _ = _case(seed=1)
    with torch.no_grad():
        ref = _reference(x, w, targets)
        per_token = head_loss(x, w, targets, reduction="none", chunk_rows=4)
        assert per_token.shape == targets.shape and per_token[targets < 0].abs().max() == 0
        assert per_token.sum().item() == pytest.approx(ref.item(), rel=1e-6)
        assert head_loss(x, w, targets, reduction="mean").item() == pytest.approx(ref.item() / (targets >= 0).sum().item(), rel=1e-6)
    mean = head_loss(x, w, targets, reduction="mean")
    assert mean.requires_grad and mean.item() == pytest.approx(ref.item() / (targets >= 0).sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss_reduction"):
        head_loss(x, w, targets, reduction="avg")


def test_all_masked_batch_gives_exact_zeros_not_nan():
    x, w, targets, _ = _case()
    targets[:] = -1
    loss = head_loss(x, w, targets, reduction="sum", chunk_rows=3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and gx.abs().max() == 0 and gw.abs().max() == 0


def test_bf16_autocast_matches_the_autocast_textbook_path():
    x, w, targets, _ = _case(C=32, V=64)
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(x, w, targets, reduction="sum", chunk_rows=4)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.dtype == x.dtype and gw.dtype == torch.float32
    ref = _reference(x.bfloat16().float(), w.bfloat16().float(), targets)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    assert (gx - gx_ref).norm() / gx_ref.norm() < 2e-2 and (gw - gw_ref).norm() / gw_ref.norm() < 2e-2


def test_chunk_kernel_gradient_is_the_softmax_through_the_softcap():
    """d/dlogits of CE(softcap(z)) = (softmax(softcap(z)) - onehot) * (1 - tanh^2), checked by autograd."""
    z = (torch.randn(4, 9, dtype=torch.float64) * 30).requires_grad_()
    t = torch.tensor([0, 3, -1, 8])
    weights = torch.tensor([1.0, 2.0, 0.0, -0.5], dtype=torch.float64)
    loss, grad = chunk_loss_and_grad(z, t, weights)
    capped = LOGIT_SOFTCAP * torch.tanh(z / LOGIT_SOFTCAP)
    ref = (F.cross_entropy(capped, t, ignore_index=-1, reduction="none") * weights).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, z)[0])


# ---------------------------------------------------------------------------------------- the step

def _backend(seed=0, clip=0.0):
    cfg = load_config("demo", [f"pretrain.grad_clip={clip}", "pretrain.muon_dtype=fp32"])
    model = random_model(depth=2, vocab_size=64, sequence_len=16, seed=seed).train()
    return model, TorchBackend(model, cfg.pretrain, "cpu", "fp32")


def _rows(seed=3, rows=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (rows, 17), generator=g)
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    targets[0, :10] = -1          # uneven numbers of supervised tokens per row
    targets[5:7] = -1              # rows with none at all
    weights = torch.rand(rows, 16, generator=g) + 0.5
    return inputs, targets, weights


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulation_gives_the_update_of_one_big_batch(weighted):
    inputs, targets, weights = _rows()
    results = {}
    for split in (1, 4):   # one micro-batch of 8 rows vs 4 of 2 (one of them has no supervised token)
        model, backend = _backend()
        batches = [Batch(i, t, w if weighted else None)
                   for i, t, w in zip(inputs.chunk(split), targets.chunk(split), weights.chunk(split))]
        result = train_step(backend, iter(batches), 0, Schedule(10), split)
        results[split] = (result, _state(model))
    (one, big), (four, small) = results[1], results[4]
    assert one.supervised == four.supervised == int((targets >= 0).sum()) and one.tokens == four.tokens == inputs.numel()
    assert four.loss == pytest.approx(one.loss, rel=1e-6) and four.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_loss_is_the_mean_over_supervised_tokens_of_the_step():
    inputs, targets, _ = _rows()
    model, backend = _backend()
    with torch.no_grad():
        expected = model(inputs, targets, loss_reduction="sum").item() / (targets >= 0).sum().item()
    batches = [Batch(i, t) for i, t in zip(inputs.chunk(2), targets.chunk(2))]
    assert train_step(backend, iter(batches), 0, Schedule(10), 2).loss == pytest.approx(expected, rel=1e-6)


def test_a_stage_normaliser_divides_the_step_instead_of_the_supervised_tokens():
    """RL's Dr. GRPO divides by a constant per row: the loss and the gradient are those of sum / constant."""
    inputs, targets, _ = _rows()
    model, backend = _backend()
    per_row = lambda batches: 25.0 * sum(b.inputs.shape[0] for b in batches)   # 8 rows -> 200
    batches = [Batch(i, t) for i, t in zip(inputs.chunk(2), targets.chunk(2))]
    result = train_step(backend, iter(batches), 0, Schedule(10), 2, normalizer=per_row)
    reference, _ = _backend()
    loss = reference(inputs, targets, loss_reduction="sum") / 200.0
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    assert result.loss == pytest.approx(loss.item(), rel=1e-6) and result.supervised == int((targets >= 0).sum())
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)


def test_micro_batch_without_targets_adds_nothing():
    """Appending an all-masked micro-batch changes neither the loss nor the update."""
    inputs, targets, _ = _rows()
    model_a, backend_a = _backend()
    train_step(backend_a, iter([Batch(inputs, targets)]), 0, Schedule(10), 1)
    model_b, backend_b = _backend()
    empty = Batch(inputs[:2], torch.full_like(targets[:2], -1))
    result = train_step(backend_b, iter([Batch(inputs, targets), empty]), 0, Schedule(10), 2)
    assert math.isfinite(result.loss) and math.isfinite(result.grad_norm)
    a, b = _state(model_a), _state(model_b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_step_without_any_supervised_token_is_skipped_and_changes_nothing():
    inputs, targets, _ = _rows()
    model, backend = _backend()
    before = _state(model)
    result = train_step(backend, iter([Batch(inputs, torch.full_like(targets, -1))]), 0, Schedule(10), 1)
    assert result.skipped and result.supervised == 0 and result.tokens == inputs.numel() and math.isnan(result.loss)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert not backend.adamw.state and not backend.muon.state   # no optimizer step was taken


def test_clipping_scales_every_parameter_by_the_global_norm():
    """grad_clip clips all parameters together, Muon's matrices included (nanochat v0): with a tiny
    threshold, the first AdamW step and the Muon momentum see gradients scaled by clip / global norm."""
    inputs, targets, _ = _rows()
    model, backend = _backend(clip=1e-3)
    captured = {}
    step = backend.muon.step

    def spy():
        captured["muon"] = [p.grad.clone() for p in backend.muon_params]
        captured["adamw"] = [p.grad.clone() for p in backend.adamw_params]
        step()
    backend.muon.step = spy
    result = train_step(backend, iter([Batch(inputs, targets)]), 0, Schedule(10), 1)
    reference, _ = _backend()
    n = int((targets >= 0).sum())
    (reference(inputs, targets, loss_reduction="sum") / n).backward()
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    assert result.grad_norm == pytest.approx(total, rel=1e-5)
    coefficient = 1e-3 / (total + 1e-6)
    clipped_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in captured["muon"] + captured["adamw"]))
    assert clipped_norm == pytest.approx(1e-3, rel=1e-4)
    muon_ref = [p.grad for p in reference.transformer.h.parameters()]
    adamw_ref = [reference.lm_head.weight.grad, reference.transformer.wte.weight.grad]   # build_param_groups' order
    for got, ref in zip(captured["muon"] + captured["adamw"], muon_ref + adamw_ref):
        torch.testing.assert_close(got, ref * coefficient, rtol=1e-4, atol=1e-12)
