"""The DeepSpeed backend follows the step's loss semantics exactly: 2 gloo ranks with uneven numbers of
supervised tokens, an all-masked micro-batch and global clipping give the update of one process that sees
all the micro-batches (no double 1/GAS scaling, no update from masked data, Muon clipped too), and its
checkpointed optimizer state resumes exactly."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from raychat.config import load_config
from raychat.train.step import Batch, Schedule, train_step

from modelkit import random_model

STEPS, ACCUM, ROWS = 3, 2, 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches(step: int, rank: int) -> list[Batch]:
    """Rank r's micro-batches of `step`: uneven masks, and rank 1's last one has no target at all."""
    out = []
    for micro in range(ACCUM):
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
        x = torch.randint(0, 64, (ROWS, 17), generator=g)
        targets = x[:, 1:].clone()
        targets[0, : 3 + 4 * rank + micro] = -1
        if rank == 1 and micro == ACCUM - 1:
            targets[:] = -1
        out.append(Batch(x[:, :-1], targets))
    return out


def _config(clip: float, zero_stage: int = 2):
    return load_config("demo", [f"pretrain.grad_clip={clip}", f"pretrain.zero_stage={zero_stage}",
                                "pretrain.muon_dtype=fp32"]).pretrain


def _worker(rank, world, port, out, clip, zero_stage):
    import torch.distributed as dist
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from raychat.train.backend import DeepSpeedBackend
        model = random_model(depth=2, vocab_size=64, sequence_len=16).train()
        backend = DeepSpeedBackend(model, _config(clip, zero_stage), "cpu", "fp32", ROWS, ACCUM)
        results = []
        for step in range(STEPS):
            r = train_step(backend, iter(_micro_batches(step, rank)), step, Schedule(10), ACCUM)
            results.append((r.loss, r.grad_norm, r.supervised))
            if step == 0:   # save after the first step, reload into a fresh backend, continue from there
                state = backend.optimizer_state()
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                model = random_model(depth=2, vocab_size=64, sequence_len=16, seed=7).train()
                backend = DeepSpeedBackend(model, _config(clip, zero_stage), "cpu", "fp32", ROWS, ACCUM)
                model.load_state_dict(weights)
                backend.load_optimizer_state(state)
        torch.save({"params": {k: v.detach() for k, v in model.state_dict().items()}, "results": results},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _reference(clip):
    """One process, plain torch: each step accumulates all 4 micro-batches of both ranks."""
    from raychat.train.backend import TorchBackend
    model = random_model(depth=2, vocab_size=64, sequence_len=16).train()
    backend = TorchBackend(model, _config(clip), "cpu", "fp32")
    results = []
    for step in range(STEPS):
        batches = _micro_batches(step, 0) + _micro_batches(step, 1)
        r = train_step(backend, iter(batches), step, Schedule(10), 2 * ACCUM)
        results.append((r.loss, r.grad_norm, r.supervised))
    return model.state_dict(), results


@pytest.mark.parametrize("clip,zero_stage", [(0.0, 2), (0.05, 2), (0.05, 1)])
def test_deepspeed_two_ranks_equal_one_process_with_all_micro_batches(tmp_path, clip, zero_stage):
    reference, ref_results = _reference(clip)
    initial = random_model(depth=2, vocab_size=64, sequence_len=16).state_dict()
    out = tmp_path / "rank"
    mp.start_processes(_worker, args=(2, _free_port(), str(out), clip, zero_stage), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    if clip:
        assert all(norm > 10 * clip for _, norm, _ in ref_results)   # the clip really fired at every step
    for (loss, norm, tokens), (ref_loss, ref_norm, ref_tokens) in zip(ranks[0]["results"], ref_results):
        assert tokens == ref_tokens
        assert loss == pytest.approx(ref_loss, rel=1e-5) and math.isfinite(loss)
        assert norm == pytest.approx(ref_norm, rel=1e-4)
    for name, ref in reference.items():
        a, b = ranks[0]["params"][name], ranks[1]["params"][name]
        assert torch.equal(a, b), f"{name}: ranks disagree"
        change = (ref - initial[name]).abs().max()
        assert change > 0, name
        assert (a - ref).abs().max() / change <= 1e-4, f"{name}: {(a - ref).abs().max() / change:.2e}"


def test_deepspeed_forward_computes_in_bf16_even_where_the_engine_turns_autocast_off(tmp_path, monkeypatch):
    """DeepSpeed's engine.forward switches off a CUDA autocast that is on around it (the first GPU run
    trained d20 in fp32 because of it). The backend's forward re-enters autocast inside the engine: here
    the engine's switch-off is reproduced with torch's own context, on CPU."""
    import torch.distributed as dist

    from raychat.train.backend import DeepSpeedBackend
    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = random_model(depth=1, vocab_size=64, sequence_len=16).train()
        backend = DeepSpeedBackend(model, _config(0.0), "cpu", "bf16", ROWS, 1)
        seen = []
        model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        batch = _micro_batches(0, 0)[0]
        with torch.autocast("cpu", enabled=False):   # what DeepSpeed does around the module on CUDA
            loss = backend.engine(batch.inputs, batch.targets, loss_reduction="sum")
        assert seen == [torch.bfloat16] and torch.isfinite(loss)
        assert backend.engine.torch_autocast_enabled() and backend.engine.torch_autocast_dtype() == torch.bfloat16
    finally:
        dist.destroy_process_group()
