"""Things every stage needs: where files go, which device to use, logging, offline data, and Ray."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, corrupt file). The CLI prints it as one line."""


# ------------------------------------------------------------------------------------------ directories

def get_base_dir() -> Path:
    """Root of everything raychat writes: RAYCHAT_BASE_DIR, default ~/.cache/raychat."""
    base = Path(os.environ.get("RAYCHAT_BASE_DIR") or Path.home() / ".cache" / "raychat").expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


def tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def base_data_dir() -> Path:
    """Downloaded FineWeb-EDU shards."""
    return get_base_dir() / "base_data"


def checkpoint_dir(stage: str, run_name: str, storage_path: str = "") -> Path:
    """checkpoints/{stage}/{run}: on the cluster storage path when one is configured."""
    root = Path(storage_path) if storage_path else get_base_dir()
    return root / "checkpoints" / stage / run_name


def report_dir() -> Path:
    return get_base_dir() / "report"


def tensorboard_dir(stage: str, run_name: str) -> Path:
    return get_base_dir() / "tb" / stage / run_name


def get_data_dir(subdir: str = "") -> Path | None:
    """Offline datasets: RAYCHAT_DATA_DIR[/subdir], or None when unset (then stages download)."""
    root = os.environ.get("RAYCHAT_DATA_DIR")
    if not root:
        return None
    path = Path(root).expanduser().resolve() / subdir
    if not path.exists():
        raise UserError(f"RAYCHAT_DATA_DIR is set but {path} does not exist")
    return path


# ------------------------------------------------------------------------------------- atomic writes

def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part: temp file in the same
    directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final`. An existing `final` is moved aside first and
    dropped only after the rename, so there is always one complete copy on disk."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


# ------------------------------------------------------------------------------------------- devices

def detect_device() -> str:
    """'cuda', 'mps' or 'cpu' (torch is imported lazily: the CLI's --help must stay fast)."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(setting: str, device: str) -> str:
    """'auto' means bf16 on an accelerator, fp32 on CPU (bf16 is ~3x slower on AVX2 CPUs)."""
    if setting != "auto":
        return setting
    return "bf16" if str(device).startswith("cuda") else "fp32"


# ------------------------------------------------------------------------------------------- logging

def get_rank() -> int:
    """Global rank of this process (0 outside distributed runs)."""
    for var in ("RANK", "WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return record.rank == 0 or record.levelno >= logging.WARNING or os.environ.get("RAYCHAT_LOG_ALL_RANKS") == "1"


def get_logger(name: str = "raychat") -> logging.Logger:
    """Logger that prints INFO on rank 0 only (warnings and errors on every rank), tagged with the rank."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("RAYCHAT_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------- Ray

# Set before Ray starts a local node (docs/ray_and_deepspeed.md): node on 127.0.0.1 instead of eth0, fast
# ray.train.report (the 2 s default health check makes each report cost ~1.3 s), quiet Ray Data logs.
# set in every GPU worker before CUDA starts: the caching allocator grows segments instead of fragmenting
# (activations of different sizes at every micro-step would otherwise strand GiBs)
GPU_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def _job_env_vars() -> set[str]:
    """The variables the runtime env of a submitted job (`ray job submit --runtime-env ...`) already sets for
    the driver and every worker; Ray passes the job's config to its driver in this variable."""
    import json
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return set()
    return set(((job.get("runtime_env") or {}).get("env_vars") or {}))


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs):
    """Connect to RAY_ADDRESS when it is set (a cluster, or inside `ray job submit`); otherwise start a
    local Ray on 127.0.0.1 with enough logical CPUs for Ray Data beside the train workers.

    On 2 cores, 2 train workers holding one CPU each leave Ray Data no CPU and the pipeline hangs
    (docs/ray_and_deepspeed.md), so the local node advertises at least 4 logical CPUs.
    """
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    if ray.is_initialized():
        return ray
    env_vars = {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]} if "DS_ACCELERATOR" in os.environ else {}
    env_vars.update({k: os.environ[k] for k in ("RAYCHAT_BASE_DIR", "RAYCHAT_DATA_DIR") if k in os.environ})
    for key in _job_env_vars():   # Ray refuses a ray.init runtime env that sets a job's variable again
        env_vars.pop(key, None)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, **kwargs)
        return ray
    if num_cpus is None:
        num_cpus = max(4, (os.cpu_count() or 1) + 2)
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env=runtime_env, **kwargs)
    return ray
