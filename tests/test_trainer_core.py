"""The stage-generic trainer core without Ray: compile scope, the shared loop driven by a stage (resume,
pruning, out-of-memory advice), the data budget, devices and horizons."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

import raychat.model
from raychat.common import UserError
from raychat.config import load_config
from raychat.train.base import BaseStage, plan_horizon
from raychat.train.loop import run_stage, worker_device
from raychat.train.step import Batch, Schedule, train_step

from modelkit import random_model


# ------------------------------------------------------------------------------------------ compile

@pytest.fixture
def compiled_loss_kernel_restored(monkeypatch):
    """compile_loss_kernel is process-wide: put the eager kernel back after the test."""
    monkeypatch.setattr(raychat.model, "_chunk_kernel", raychat.model.chunk_loss_and_grad)


def test_evaluation_and_sampling_never_recompile_the_training_graph(compiled_loss_kernel_restored):
    """With compile on, only the training step's callable is compiled: bits-per-byte on other shapes and
    KV-cache decoding run the eager model and leave dynamo's counters as they were."""
    from raychat.engine import Engine
    from raychat.eval.bpb import bpb_totals
    from raychat.train.backend import TorchBackend
    torch._dynamo.reset()
    counters.clear()
    model = random_model(depth=2, vocab_size=64, sequence_len=32).train()
    backend = TorchBackend(model, load_config("demo").pretrain, "cpu", "fp32", compile="aot_eager")
    g = torch.Generator().manual_seed(0)

    def batches(rows, length):
        while True:
            x = torch.randint(0, 64, (rows, length + 1), generator=g)
            yield x[:, :-1], x[:, 1:]

    train = batches(4, 16)
    for step in range(2):
        train_step(backend, train, step, Schedule(10), 2)
    compiled = dict(counters["stats"])
    assert compiled["unique_graphs"] >= 2   # the trunk and the loss kernel
    frames = counters["frames"]["total"]

    model.eval()
    bpb_totals(model, [next(batches(3, 24)), next(batches(5, 9))], torch.ones(64, dtype=torch.long))
    engine = Engine(model)
    list(engine.generate([1, 2, 3], num_samples=2, max_tokens=6, temperature=1.0))
    engine.generate_many([[1, 2], [3, 4, 5, 6]], max_tokens=5, temperature=0.0)
    model.train()
    assert counters["frames"]["total"] == frames   # eager: dynamo never saw these calls
    train_step(backend, train, 2, Schedule(10), 2)
    assert dict(counters["stats"]) == compiled and not counters["recompiles"]


# -------------------------------------------------------------------------------------- the loop

def _cfg(name, *extra):
    return load_config("demo", [
        f"run.name={name}", "pretrain.depth=1", "pretrain.sequence_len=32", "pretrain.max_seq_len=32",
        "pretrain.device_batch_size=4", "pretrain.total_batch_size=256", "pretrain.num_iterations=6",
        "pretrain.save_every=2", "pretrain.eval_every=3", "pretrain.eval_tokens=256", "pretrain.log_every=1",
        "run.keep_checkpoints=1", *extra])


@pytest.fixture
def base_dir(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(tmp_path / "tokenizer")
    return tmp_path


def _run(cfg, stage_cls=BaseStage):
    stage = stage_cls(cfg)
    stage = stage_cls(cfg, {**stage.preflight(), "ray_data": False})
    return run_stage(stage, 0, 1, "cpu", use_deepspeed=False)


def test_bare_loop_trains_evaluates_prunes_and_resumes(base_dir):
    metrics = _run(_cfg("loop"))
    root = base_dir / "checkpoints" / "base" / "loop"
    assert metrics["step"] == 6 and "val_bpb" in metrics
    # keep_checkpoints=1: the newest one besides the final one is left; nothing half-deleted
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000006"]
    meta = json.loads((root / "step_000006" / "meta.json").read_text())
    assert meta["trainer"] == "torch" and meta["parent"] is None
    assert set(meta["files"]) == {"model.safetensors", "optim_rank000.pt", "trainer_rank000.pt"}   # one copy of the weights
    # a longer horizon continues from step 6; its final checkpoint is 8, and 6 is the newest of the others
    longer = _run(_cfg("loop", "pretrain.num_iterations=8"))
    assert longer["step"] == 8
    assert sorted(p.name for p in root.iterdir()) == ["step_000006", "step_000008"]


def test_out_of_memory_in_a_step_names_the_knob(base_dir):
    class Exhausted(BaseStage):
        @staticmethod
        def loss_fn(model, batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    with pytest.raises(UserError, match=r"out of GPU memory at 4 rows per micro-batch: set pretrain.memory_split=2"):
        _run(_cfg("oom"), Exhausted)


# ---------------------------------------------------------------------------------- plans and budgets

def test_memory_split_keeps_tokens_per_step_and_refuses_what_does_not_divide():
    cfg = load_config("d20", ["pretrain.memory_split=2"])
    h = plan_horizon(cfg.pretrain, 8, num_params=560_988_160, ratio=20)
    assert (h.micro_batch_size, h.grad_accum_steps, h.tokens_per_step) == (16, 2, 524_288)
    with pytest.raises(UserError, match=r"memory_split \(3\) must divide device_batch_size \(32\)"):
        plan_horizon(load_config("d20", ["pretrain.memory_split=3"]).pretrain, 8, 560_988_160, 20)


def test_shard_budget_grows_with_the_cropped_fraction():
    from raychat.data.fineweb import num_train_shards
    cfg = load_config("d20")
    tokens = 11_200_000_000
    plain = num_train_shards(cfg, tokens, chars_per_token=4.8)
    cropped = num_train_shards(cfg, tokens, chars_per_token=4.8, cropped_fraction=0.35)
    assert plain == 237 and cropped == 364   # ceil(11.2e9 x 4.8 / 250e6 x 1.1 = 236.5) and ceil(236.5 / 0.65)


def test_measured_packing_matches_what_the_stream_crops(tokenizer, data_dir):
    from raychat.data.fineweb import shard_paths
    from raychat.data.pretrain import PretrainStream, measure_packing
    cfg = load_config("demo", ["data.packing=bos_bestfit"])
    paths = shard_paths(cfg, "train", download=False)
    measured = measure_packing(tokenizer, paths, "bos_bestfit", 64, cfg.data.buffer_docs, max_docs=300)
    assert 0.0 < measured["cropped_fraction"] < 1.0 and 2.0 < measured["chars_per_token"] < 8.0
    concat = measure_packing(tokenizer, paths, "concat", 64, cfg.data.buffer_docs, max_docs=300)
    assert concat["cropped_fraction"] == 0.0
    # the stream over the same documents crops the same fraction (same packer, same order)
    stream = PretrainStream(cfg, tokenizer, "train", 4, 64, use_ray=False, download=False)
    rows_needed = int(measured["documents"] * 0.5)
    for _ in range(rows_needed // 4):
        next(stream)
    assert stream.stats()["cropped_fraction"] == pytest.approx(measured["cropped_fraction"], abs=0.1)
    stream.close()


def test_worker_device_never_leaves_a_bare_cuda():
    assert worker_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert worker_device("cuda") == f"cuda:{torch.cuda.current_device()}"


def test_batch_accepts_stream_pairs_and_moves_with_its_weights():
    pair = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    batch = Batch.of(pair)
    assert batch.weights is None and torch.equal(batch.targets, pair[1])
    weighted = Batch(pair[0], pair[1], torch.full((2, 3), 0.5)).to("cpu")
    assert weighted.weights.dtype == torch.float32 and Batch.of(weighted) is weighted


def test_a_corpus_smaller_than_the_horizon_is_announced_and_its_wrap_warned_once(tmp_path, monkeypatch, tokenizer, caplog):
    """Preflight says how many epochs the local shards give; the loop warns once when the stream wraps."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq
    shards = tmp_path / "data" / "pretrain" / "shards"
    shards.mkdir(parents=True)
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()
    for index, count in ((0, 40), (1, 8)):   # a tiny train shard and a validation shard
        texts = [" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(count)]
        pq.write_table(pa.table({"text": texts}), shards / f"shard_{index:05d}.parquet")
    monkeypatch.setenv("RAYCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))
    tokenizer.save(tmp_path / "base" / "tokenizer")
    caplog.set_level(logging.WARNING, logger="raychat.train")
    metrics = _run(_cfg("wrap", "pretrain.num_iterations=12", "pretrain.eval_every=0", "pretrain.save_every=0"))
    assert metrics["step"] == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the stream will repeat its documents" in w for w in warnings), warnings
    wrapped = [w for w in warnings if "the training data wrapped into epoch 2" in w]
    assert len(wrapped) == 1, warnings
