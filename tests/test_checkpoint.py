"""Model checkpoints: round trip, bf16 on CPU, corruption and mismatch refused, latest complete step."""
import json
import logging

import pytest
import torch
from safetensors import safe_open

from raychat.checkpoint import (CheckpointError, atomic_directory, latest_checkpoint, load_model, load_stage_model,
                                save_model, verify_checkpoint)
from raychat.common import checkpoint_dir, tokenizer_dir
from raychat.model import GPTConfig, build_model


def tiny_model(seed=0, depth=2):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(depth=depth, vocab_size=64, sequence_len=32))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model


def test_round_trip(tmp_path):
    model = tiny_model()
    path = save_model(tmp_path / "step_000007", model, {"step": 7, "metrics": {"val_bpb": 1.5}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000007"]  # no temp dir left behind
    loaded, meta = load_model(path)
    assert meta["step"] == 7 and meta["metrics"] == {"val_bpb": 1.5}
    assert meta["model_config"] == {"depth": 2, "vocab_size": 64, "sequence_len": 32, "n_kv_head": 1}
    assert set(meta["files"]) == {"model.safetensors"} and len(meta["files"]["model.safetensors"]) == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx), loaded(idx))
    assert not loaded.training


def test_bf16_checkpoint_loads_on_cpu(tmp_path):
    model = tiny_model().to(torch.bfloat16)  # as a GPU run would store it
    path = save_model(tmp_path / "step_000001", model, {"step": 1})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    loaded, _ = load_model(path, device="cpu")
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())
    assert loaded(torch.randint(0, 64, (1, 8))).isfinite().all()
    as_bf16, _ = load_model(path, dtype=torch.bfloat16)
    assert as_bf16.lm_head.weight.dtype == torch.bfloat16 and as_bf16.cos.dtype == torch.float32


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path):
    path = save_model(tmp_path / "step_000001", tiny_model(), {"step": 1})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_model(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "step_000099")


def test_mismatched_config_is_refused(tmp_path):
    path = save_model(tmp_path / "step_000001", tiny_model(), {"step": 1})
    meta = json.loads((path / "meta.json").read_text())
    meta["model_config"]["depth"] = 4
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its model_config"):
        load_model(path)
    meta["model_config"] = {"depth": "x"}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no valid model_config"):
        load_model(path)


def test_latest_checkpoint_skips_corrupt_and_incomplete(tmp_path, caplog):
    assert latest_checkpoint(tmp_path / "nothing") is None
    for step in (100, 200, 300):
        save_model(tmp_path / f"step_{step:06d}", tiny_model(seed=step), {"step": step})
    (tmp_path / "step_000300" / "model.safetensors").write_bytes(b"truncated")
    (tmp_path / "step_000400").mkdir()                         # no meta.json: a crash mid-write
    (tmp_path / ".step_000500.tmp-1234").mkdir()               # a temp dir is never a candidate
    logging.getLogger("raychat.checkpoint").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="raychat.checkpoint"):
            assert latest_checkpoint(tmp_path) == tmp_path / "step_000200"
    finally:
        logging.getLogger("raychat.checkpoint").propagate = False
    assert "step_000300" in caplog.text and "step_000400" in caplog.text


def test_atomic_directory_keeps_old_copy_on_failure_and_replaces_on_success(tmp_path):
    path = save_model(tmp_path / "step_000001", tiny_model(seed=1), {"step": 1, "tag": "old"})
    with pytest.raises(RuntimeError):
        with atomic_directory(path) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert load_model(path)[1]["tag"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    save_model(path, tiny_model(seed=2), {"step": 1, "tag": "new"})
    assert load_model(path)[1]["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_load_stage_model_checks_the_tokenizer(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="no complete sft checkpoint"):
        load_stage_model("sft", "r1")
    tokenizer.save(tokenizer_dir())
    stage = checkpoint_dir("sft", "r1")
    model = build_model(GPTConfig(depth=1, vocab_size=tokenizer.get_vocab_size(), sequence_len=16))
    save_model(stage / "step_000010", model, {"step": 10, "tokenizer_fingerprint": tokenizer.fingerprint()})
    save_model(stage / "step_000020", model, {"step": 20, "tokenizer_fingerprint": "0" * 64})
    loaded, tok, meta = load_stage_model("sft", "r1", step=10)
    assert meta["step"] == 10 and tok.fingerprint() == tokenizer.fingerprint()
    assert loaded.config.vocab_size == tokenizer.get_vocab_size()
    with pytest.raises(CheckpointError, match="trained with tokenizer 000000000000"):
        load_stage_model("sft", "r1")  # the latest (step 20) belongs to another tokenizer
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_stage_model("sft", "r1", step=30)
