"""Checkpoints on disk: atomic, checksummed, and never loaded half-written.

Layout: `checkpoint_dir(stage, run)/step_{NNNNNN}/` with `model.safetensors` (the weights, stored in
their training dtype) and `meta.json`, written last: `{"step", "model_config", "tokenizer_fingerprint",
"files": {relative path: sha256}, "metrics", ...}`. A checkpoint is written into a temporary sibling
directory, every file is fsynced, then the directory is renamed into place, so a reader sees either no
checkpoint or a complete one. A directory without a valid meta.json, or whose files do not match their
checksums, is refused (`CheckpointError`, naming the path).

This module has the model part (`save_model`, `load_model`, `load_stage_model`) and the primitives the
training-state checkpoints in `raychat/train/checkpointing.py` build on (`write_meta`, `verify_checkpoint`,
`latest_checkpoint`, `fsync_dir`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from raychat.common import (UserError, checkpoint_dir, fsync_dir, fsync_file, get_logger,  # noqa: F401
                            replace_directory, tokenizer_dir)

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")

log = get_logger("raychat.checkpoint")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not fit (the message names the path)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------- files and fsync

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_meta(directory: Path, meta: dict, checksums: dict[str, str] | None = None) -> dict:
    """Checksum and fsync every file under `directory`, then write meta.json (with "files") last,
    atomically. Returns the meta written. `checksums` ({relative path: sha256}) are taken as given for
    the files their writers already hashed (and fsynced): those are not read again."""
    directory = Path(directory)
    checksums = checksums or {}
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != META_FILE:
            name = path.relative_to(directory).as_posix()
            if name not in checksums:
                fsync_file(path)
            files[name] = checksums.get(name) or sha256_file(path)
    meta = {**meta, "files": files}
    tmp = directory / f".{META_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META_FILE)
    for sub in {directory, *(p.parent for p in directory.rglob("*") if p.is_file())}:
        fsync_dir(sub)
    return meta


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {directory} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path} has no 'files' table: not a raychat checkpoint")
    return meta


def checkpoint_files(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of the files the checkpoint's meta.json lists."""
    return read_meta(directory)["files"]


def verify_checkpoint(directory: Path, files: list[str] | None = None) -> None:
    """Raise CheckpointError unless meta.json is valid and every listed file (or just `files`) exists with
    its recorded checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}")
    listed = checkpoint_files(directory)
    for name in files if files is not None else sorted(listed):
        if name not in listed:
            raise CheckpointError(f"{directory / META_FILE} does not list {name}")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if sha256_file(path) != listed[name]:
            raise CheckpointError(f"{path} is corrupt (sha256 differs from {META_FILE})")


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling of `final` to fill; on success it replaces `final` in one rename.
    On an exception the temporary directory is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_checkpoint(stage_dir: Path, files: list[str] | None = None) -> Path | None:
    """The `step_*` directory with the highest step that verifies (all files, or just `files`); corrupt
    or incomplete ones are skipped with a warning. None when there is none."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    candidates = sorted(((int(m.group(1)), p) for p in stage_dir.iterdir()
                         if p.is_dir() and (m := STEP_DIR.match(p.name))), reverse=True)
    for _, path in candidates:
        try:
            verify_checkpoint(path, files)
            return path
        except CheckpointError as e:
            log.warning(f"skipping checkpoint {path}: {e}")
    return None


# ------------------------------------------------------------------------------------------- model

def _unwrap(model):
    model = getattr(model, "module", model)      # DeepSpeed engine / DDP
    return getattr(model, "_orig_mod", model)    # torch.compile


def save_model(directory: Path, model, meta: dict) -> Path:
    """Write `directory` (e.g. .../step_000100) with model.safetensors and meta.json, atomically. The
    weights keep their dtype (bf16 or fp32); meta gets "model_config" and the file checksums."""
    from safetensors.torch import save_file
    model = _unwrap(model)
    directory = Path(directory)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / MODEL_FILE))
        write_meta(tmp, {**meta, "model_config": model.config.to_dict()})
    return directory


def load_model(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True):
    """(model in eval mode, meta). Weights stored in bf16 or fp32 load on any device; the model is fp32
    unless `dtype` is given. A missing, corrupt or mismatched checkpoint raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from raychat.model import GPTConfig, build_model
    directory = Path(directory)
    if verify:
        verify_checkpoint(directory, [MODEL_FILE])
    meta = read_meta(directory)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / META_FILE} has no valid model_config ({e})") from None
    path = directory / MODEL_FILE
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from None
    model = build_model(config, device=device, init=False)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])[:3]
        raise CheckpointError(f"{path} does not match its model_config {config}: missing {missing}, "
                              f"unexpected {extra}, wrong shape {wrong}")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])  # casts bf16 -> the model's fp32 (or the reverse)
    if dtype is not None:
        model.to(dtype=dtype)
        model.cos.data, model.sin.data = model.cos.data.float(), model.sin.data.float()
        model.init_rotary()  # rotary tables stay fp32 (exact positions)
    return model.eval(), meta


def load_stage_model(stage: str, run: str = "default", step: int | None = None, device: str = "cpu",
                     storage_path: str = ""):
    """(model, tokenizer, meta) of a stage's checkpoint: the latest complete one, or `step`. The tokenizer
    is the one in `common.tokenizer_dir()`, and must be the one the model was trained with."""
    from raychat.tokenizer import get_tokenizer
    stage_dir = checkpoint_dir(stage, run, storage_path)
    if step is None:
        path = latest_checkpoint(stage_dir, [MODEL_FILE])
        if path is None:
            raise CheckpointError(f"no complete {stage} checkpoint in {stage_dir}: train the {stage} stage first")
    else:
        path = stage_dir / step_dir_name(step)
        verify_checkpoint(path, [MODEL_FILE])
    model, meta = load_model(path, device=device, verify=False)
    tokenizer = get_tokenizer()
    fingerprint = meta.get("tokenizer_fingerprint")
    if fingerprint != tokenizer.fingerprint():
        raise CheckpointError(f"checkpoint {path} was trained with tokenizer {str(fingerprint)[:12]}, but the "
                              f"tokenizer in {tokenizer_dir()} is {tokenizer.fingerprint()[:12]}: use the matching tokenizer")
    return model, tokenizer, meta
