"""Muon + AdamW: Newton-Schulz, the update formula, schedules, overfitting, and distributed equivalence."""
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from raychat.model import GPTConfig, build_model
from raychat.optim import (Muon, build_optimizers, build_param_groups, lr_multiplier, muon_momentum, newton_schulz,
                           orthogonalise, set_lr_multiplier)


def test_newton_schulz_singular_values_near_one():
    torch.manual_seed(0)
    for shape in [(128, 32), (32, 128), (256, 512)]:
        G = torch.randn(*shape) * 1e-3
        s = torch.linalg.svdvals(newton_schulz(G))
        assert s.min() > 0.65 and s.max() < 1.25, shape
        assert s.mean().item() == pytest.approx(0.9, abs=0.12)
    # an ill-conditioned square matrix (condition number 1e3): the bulk of the spectrum is pulled to ~1
    G = torch.randn(64, 64) @ torch.diag(torch.logspace(-3, 0, 64))
    s = torch.linalg.svdvals(newton_schulz(G))
    assert s.max() < 1.25 and (s > 0.65).float().mean() > 0.6
    assert torch.linalg.svdvals(G).min() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_newton_schulz_equals_one_matrix_at_a_time(dtype):
    """Same-shape matrices orthogonalised together (one stack, batched products) give bitwise the result of
    each matrix alone, for wide, tall and square shapes, small ones and ones large enough for the block
    split of X X^T; so stacking (on CUDA) cannot change an update."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (96, 32), (32, 96), (64, 64), (96, 32), (256, 320), (64, 64), (32, 96), (96, 32),
              (48, 16), (320, 256), (256, 320)]
    grads = [torch.randn(*shape, generator=g) for shape in shapes]
    alone = [newton_schulz(G, 5, dtype) for G in grads]
    for stack in (False, True):
        got = orthogonalise(grads, 5, dtype, stack=stack)
        assert [tuple(x.shape) for x in got] == shapes
        for x, reference in zip(got, alone):
            assert x.dtype == dtype and torch.equal(x, reference)
    tall = [1, 4, 8]   # the three 96x32 matrices as one 3-D input
    assert torch.equal(newton_schulz(torch.stack([grads[i] for i in tall]), 5, dtype),
                       torch.stack([alone[i] for i in tall]))
    with pytest.raises(ValueError, match="stack of matrices"):
        newton_schulz(torch.zeros(2, 2, 4, 4))


def test_gram_block_split_is_the_symmetric_product():
    """`_gram` (3 of the 4 blocks of X X^T from 256 rows on) equals the plain product, also fused as
    beta * base + alpha * X X^T with a symmetric base, and is exactly symmetric off the diagonal blocks."""
    from raychat.optim import GRAM_SPLIT_MIN_ROWS, _gram
    g = torch.Generator().manual_seed(0)
    for rows in (GRAM_SPLIT_MIN_ROWS - 2, GRAM_SPLIT_MIN_ROWS, 2 * GRAM_SPLIT_MIN_ROWS):
        X = torch.randn(rows, 300, generator=g, dtype=torch.float64)
        base = torch.randn(rows, rows, generator=g, dtype=torch.float64)
        base = base + base.T   # symmetric, as A is in Newton-Schulz
        torch.testing.assert_close(_gram(X), X @ X.T)
        torch.testing.assert_close(_gram(X, base, beta=0.5, alpha=-2.0), 0.5 * base - 2.0 * X @ X.T)
        torch.testing.assert_close(_gram(X[None].expand(3, -1, -1)), (X @ X.T)[None].expand(3, -1, -1))
        h = rows // 2
        assert torch.equal(_gram(X)[h:, :h], _gram(X)[:h, h:].T) or rows < GRAM_SPLIT_MIN_ROWS


def test_muon_update_formula():
    """One step by hand: Nesterov momentum, Newton-Schulz, shape scale sqrt(max(1, rows/cols)), lr."""
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 16))
    wide = torch.nn.Parameter(torch.randn(16, 48))
    start = [tall.detach().clone(), wide.detach().clone()]
    opt = Muon([tall, wide], lr=0.1, momentum=0.9, ns_dtype=torch.float32)
    grads = [torch.randn(48, 16), torch.randn(16, 48)]
    tall.grad, wide.grad = grads[0].clone(), grads[1].clone()
    opt.step()
    for p, p0, g, scale in zip([tall, wide], start, grads, [3 ** 0.5, 1.0]):
        buf = 0.1 * g                    # momentum buffer after lerp from zero
        nesterov = g + 0.9 * (buf - g)   # grad.lerp(buf, momentum)
        expected = p0 - 0.1 * scale * newton_schulz(nesterov)
        assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert opt.param_groups[0]["initial_lr"] == 0.1
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_param_groups_and_schedules():
    model = build_model(GPTConfig(depth=3, vocab_size=64, sequence_len=16))
    groups, matrices = build_param_groups(model, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.1)
    scale = (192 / 768) ** -0.5
    assert [g["lr"] for g in groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert all(g["initial_lr"] == g["lr"] and g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.1 for g in groups)
    everything = {id(p) for g in groups for p in g["params"]} | {id(p) for p in matrices}
    assert everything == {id(p) for p in model.parameters()} and len(matrices) == 3 * 6
    adamw, muon = build_optimizers(model)
    set_lr_multiplier([adamw, muon], 0.5)
    assert muon.param_groups[0]["lr"] == 0.01 and adamw.param_groups[1]["lr"] == pytest.approx(0.1 * scale)
    # warm-up 10 steps, constant, warm-down over the last 20 of 100 to 0.1
    lrs = [lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[80] == 1.0
    assert lrs[90] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.9) and muon_momentum(1000) == 0.95


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=2, vocab_size=64, sequence_len=32))
    adamw, muon = build_optimizers(model, embedding_lr=0.2, unembedding_lr=0.02, matrix_lr=0.05)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for step in range(60):
        loss = model(x, y)
        first = loss.item() if first is None else first
        loss.backward()
        for opt in (adamw, muon):
            opt.step()
        model.zero_grad(set_to_none=True)
    assert first == pytest.approx(math.log(64), abs=1e-4)
    assert loss.item() < 0.05


# ------------------------------------------------------------------------------------ distributed Muon

def _tiny_gpt():
    """depth 3: each matrix shape occurs an odd number of times, so the 2-rank split has a padded chunk."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=3, vocab_size=64, sequence_len=16))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.3)
    return model


def _batches():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(3)]


def _train(model, muon, batches, rows, micro_batches=1):
    """Muon steps on `rows` of each batch, split into micro-batches whose gradients are accumulated."""
    for batch in batches:
        for part in batch[rows].chunk(micro_batches):
            (model(part[:, :-1], part[:, 1:]) / micro_batches).backward()
        muon.step()
        model.zero_grad(set_to_none=True)


def _distributed_worker(rank, world_size, port, out_path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = _tiny_gpt()
        _, matrices = build_param_groups(model)
        muon = Muon(matrices, lr=0.02, momentum=0.95, ns_dtype=torch.float32)
        per_rank = 4 // world_size
        _train(model, muon, _batches(), slice(rank * per_rank, (rank + 1) * per_rank))
        owned = len(muon.state)
        state = muon.consolidated_state_dict()
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "state": state,
                    "owned": owned, "after_consolidate": len(muon.state)}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(micro_batches):
    model = _tiny_gpt()
    _, matrices = build_param_groups(model)
    muon = Muon(matrices, lr=0.02, momentum=0.95, ns_dtype=torch.float32)
    _train(model, muon, _batches(), slice(0, 4), micro_batches)
    return {n: p.detach() for n, p in model.named_parameters()}, muon.state_dict()["state"]


def test_distributed_muon_equals_single_process(tmp_path):
    """2 gloo processes, each with half of every batch, against one process with the whole batch in two
    accumulated micro-batches (the same global batch): the same weights and momentum, max difference
    <= 1e-5 of the 3-step weight change. Against one process doing the whole batch in one forward pass the
    gradients themselves already differ by fp32 summation order, and only that floor remains."""
    initial = {n: p.detach().clone() for n, p in _tiny_gpt().named_parameters()}
    reference, reference_state = _single_process(micro_batches=2)
    whole_batch, _ = _single_process(micro_batches=1)

    out = tmp_path / "rank"
    mp.start_processes(_distributed_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, ref in reference.items():
        a, b = ranks[0]["params"][name], ranks[1]["params"][name]
        assert torch.equal(a, b), f"{name}: ranks disagree"
        change = (ref - initial[name]).abs().max()
        if "transformer.h" in name:
            assert change > 0
            assert (a - ref).abs().max() / change <= 1e-5, name
            floor = (whole_batch[name] - ref).abs().max() / change  # two single-process runs
            assert (a - whole_batch[name]).abs().max() / change <= max(1e-5, 2 * floor), name
        else:
            assert change == 0  # not Muon's
    # the Newton-Schulz work was split: each rank kept momentum for half of the 18 matrices
    assert [r["owned"] for r in ranks] == [9, 9] and [r["after_consolidate"] for r in ranks] == [9, 9]
    # the consolidated momentum equals the single-process momentum
    for rank in ranks:
        assert sorted(rank["state"]["state"]) == sorted(reference_state)
        for key, value in reference_state.items():
            got = rank["state"]["state"][key]["momentum_buffer"]
            assert torch.allclose(got, value["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_muon_keeps_fp32_momentum_for_bf16_weights():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = Muon([p])
    p.grad = torch.randn(32, 16, dtype=torch.bfloat16)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)


def test_newton_schulz_dtype_follows_the_hardware_and_bf16_stays_close():
    """auto = bf16 where it is native (CUDA, AVX512-BF16/AMX CPUs), fp32 otherwise; bf16 Newton-Schulz
    gives nearly the same update (nanochat runs it in bf16)."""
    from raychat.optim import native_bf16, ns_dtype_for
    assert ns_dtype_for("auto", "cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    assert ns_dtype_for("fp32", "cpu") == torch.float32 and ns_dtype_for("bf16", "cpu") == torch.bfloat16
    assert ns_dtype_for("auto", "cuda") == torch.bfloat16
    G = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    exact, fast = newton_schulz(G, 5, torch.float32), newton_schulz(G, 5, torch.bfloat16).float()
    assert (fast - exact).norm() / exact.norm() < 0.05
