"""Training checkpoints: everything needed to continue a run exactly, written by all ranks together.

`step_NNNNNN/` holds `model.safetensors` (rank 0; the only copy of the weights, what eval and serve load),
one `optim_rankRRR.pt` per rank (its AdamW state, or its ZeRO partition of it, and its Muon momentum) and
one `trainer_rankRRR.pt` per rank (data cursor, RNG state); `meta.json` (config, step, metrics,
checksums) is written last. All ranks write into a temporary directory, each hashes and fsyncs what it
wrote, and rank 0 renames the directory once every file is on disk, so a half-written checkpoint is
never seen; one that fails its checksums is skipped. Only the newest `run.keep_checkpoints` are kept,
plus the run's final one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raychat.checkpoint import (STEP_DIR, CheckpointError, checkpoint_files, latest_checkpoint, sha256_file,
                                write_meta)
from raychat.common import UserError, fsync_file, get_logger, replace_directory

log = get_logger("raychat.checkpoint")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _hash_and_sync(paths: list[Path], root: Path) -> dict[str, str]:
    """fsync what this rank wrote (on a shared filesystem only the writer's fsync flushes its node) and
    return the files' checksums, so that rank 0 does not read every rank's files again."""
    digests = {}
    for path in paths:
        fsync_file(path)
        digests[path.relative_to(root).as_posix()] = sha256_file(path)
    return digests


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
    written = []
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        written.append(tmp / "model.safetensors")
    written.append(backend.save_state(tmp, rank))
    trainer_file = tmp / f"trainer_rank{rank:03d}.pt"
    torch.save({"step": step, "cursor": cursor, "rng": _rng_state()}, trainer_file)
    written.append(trainer_file)
    digests = [_hash_and_sync(written, tmp)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, digests[0])
        digests = gathered
    if rank == 0:
        checksums = {name: digest for d in digests for name, digest in d.items()}
        write_meta(tmp, {**meta, "step": step, "world_size": world}, checksums)   # fsyncs meta.json, last
        replace_directory(tmp, final)
        log.info(f"saved checkpoint {final}")
    _barrier(world)
    return final


def prune_checkpoints(root: Path, keep: int, final_step: int) -> list[Path]:
    """Keep the newest `keep` checkpoints under `root` besides the one of `final_step` (the run's last,
    always kept); delete the others (keep = 0: delete none). A checkpoint is renamed away before it is
    deleted, so a half-deleted one never looks complete. Returns the deleted paths. Rank 0 only."""
    steps = sorted((int(m.group(1)), p) for p in Path(root).iterdir()
                   if p.is_dir() and (m := STEP_DIR.match(p.name)))
    others = [p for step, p in steps if step != final_step]
    doomed = others[:-keep] if keep > 0 else []
    for path in doomed:
        trash = path.with_name(f".{path.name}.deleting")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info(f"deleted old checkpoint {path} (run.keep_checkpoints={keep})")
    return doomed


def latest_training_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose checksums verify (corrupt ones are skipped)."""
    return latest_checkpoint(Path(root)) if Path(root).exists() else None


def agreed_resume_checkpoint(root: Path, rank: int, world: int) -> Path | None:
    """Rank 0 picks (and checksums, once) the checkpoint to resume from and tells the others, so that every
    rank starts at the same step even if a file reads differently on one node."""
    choice = [str(latest_training_checkpoint(root) or "") if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def check_resumable(path: Path, model_config, tokenizer, world: int, trainer: str) -> None:
    """A checkpoint continues only the run that wrote it: same model, tokenizer, workers and trainer."""
    meta = json.loads((path / "meta.json").read_text())
    expected = {"model_config": model_config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint(),
                "world_size": world, "trainer": trainer}
    what = {"model_config": "the model shape (depth / max_seq_len / vocabulary)",
            "tokenizer_fingerprint": "the tokenizer", "world_size": "the number of workers",
            "trainer": "the trainer (DeepSpeed vs plain torch)"}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(f"checkpoint {path} cannot be resumed: {what[key]} changed ({meta.get(key)!r} -> "
                            f"{value!r}); restore the old setting or start a new run.name")


def load_training_checkpoint(path: Path, backend, rank: int, device: str) -> dict:
    """Restore weights, optimizer state and RNG (checksums were verified when the checkpoint was chosen);
    returns {"step", "cursor"} for this rank. `device` is the rank's own device (cuda:N, never a bare
    "cuda", which every rank of a node would read as cuda:0)."""
    if not set(checkpoint_files(path)) >= {"model.safetensors", f"trainer_rank{rank:03d}.pt"}:
        raise CheckpointError(f"checkpoint {path} lacks the files of rank {rank}")
    backend.model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
    backend.load_state(path, rank)
    trainer = torch.load(path / f"trainer_rank{rank:03d}.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(trainer["rng"]["cuda"])
    return {"step": trainer["step"], "cursor": trainer["cursor"]}
