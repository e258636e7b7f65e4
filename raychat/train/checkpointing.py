"""Training checkpoints: everything needed to continue a run exactly, written by all ranks together.

`step_NNNNNN/` holds `model.safetensors` (rank 0; what eval and serve load), the optimizer state of every
rank (DeepSpeed's ZeRO partitions or torch state dicts, plus Muon momentum), and one `trainer_rankRRR.pt`
per rank with its data cursor and RNG state; `meta.json` (config, step, metrics, checksums) is written last.
All ranks write into a temporary directory that rank 0 renames once every file is on disk and
checksummed, so a half-written checkpoint is never seen; one that fails its checksums is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raychat.checkpoint import CheckpointError, checkpoint_files, latest_checkpoint, write_meta
from raychat.common import UserError, get_logger, replace_directory

log = get_logger("raychat.checkpoint")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync_new_files(directory: Path, before: set[Path]) -> None:
    """fsync what this rank wrote (on a shared filesystem only the writer's fsync flushes its node)."""
    for path in set(directory.rglob("*")) - before:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_training_checkpoint(root: Path, step: int, model, backend, cursor: dict, meta: dict, rank: int,
                             world: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the final directory."""
    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)   # left over by a run that died while saving
        tmp.mkdir(parents=True)
    _barrier(world)
    if not tmp.is_dir():
        raise UserError(f"rank {rank} cannot see {tmp}: with workers on several nodes, RAYCHAT_BASE_DIR "
                        f"(or run.storage_path) must be a filesystem every node mounts")
    before = set(tmp.rglob("*"))
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
    backend.save_state(tmp, rank)
    torch.save({"step": step, "cursor": cursor, "rng": _rng_state()}, tmp / f"trainer_rank{rank:03d}.pt")
    _fsync_new_files(tmp, before)
    _barrier(world)
    if rank == 0:
        write_meta(tmp, {**meta, "step": step, "world_size": world})   # checksums every file, fsyncs meta
        replace_directory(tmp, final)
        log.info(f"saved checkpoint {final}")
    _barrier(world)
    return final


def latest_training_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose checksums verify (corrupt ones are skipped)."""
    return latest_checkpoint(Path(root)) if Path(root).exists() else None


def agreed_resume_checkpoint(root: Path, rank: int, world: int) -> Path | None:
    """Rank 0 picks (and checksums) the checkpoint to resume from and tells the others, so that every rank
    starts at the same step even if a file reads differently on one node."""
    choice = [str(latest_training_checkpoint(root) or "") if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def check_resumable(path: Path, model_config, tokenizer, world: int, trainer: str) -> None:
    """A checkpoint continues only the run that wrote it: same model, tokenizer, workers and trainer."""
    meta = json.loads((path / "meta.json").read_text())
    expected = {"model_config": model_config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint(),
                "world_size": world, "trainer": trainer}
    what = {"model_config": "the model shape (pretrain.depth / max_seq_len / vocabulary)",
            "tokenizer_fingerprint": "the tokenizer", "world_size": "the number of workers",
            "trainer": "the trainer (Ray+DeepSpeed vs bare)"}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(f"checkpoint {path} cannot be resumed: {what[key]} changed ({meta.get(key)!r} -> "
                            f"{value!r}); restore the old setting or start a new run.name")


def load_training_checkpoint(path: Path, backend, rank: int, world: int, device: str) -> dict:
    """Restore weights, optimizer state, RNG; returns {"step", "cursor"} for this rank."""
    if not set(checkpoint_files(path)) >= {"model.safetensors", f"trainer_rank{rank:03d}.pt"}:
        raise CheckpointError(f"checkpoint {path} lacks the files of rank {rank}")
    backend.model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
    backend.load_state(path, rank)
    trainer = torch.load(path / f"trainer_rank{rank:03d}.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(trainer["rng"]["cuda"])
    return {"step": trainer["step"], "cursor": trainer["cursor"]}
