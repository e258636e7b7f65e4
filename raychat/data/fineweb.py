"""FineWeb-EDU pretraining shards: where they are, how to download them, how to read their documents.

The corpus is nanochat's re-shuffle of FineWeb-EDU sample-100BT: `shard_00000.parquet` ...
`shard_01822.parquet`, one `text` column, row groups of ~1,024 documents, ~250 M characters per shard.
The last shard is the validation split. With RAYCHAT_DATA_DIR set, local shards in the same layout
(`RAYCHAT_DATA_DIR/pretrain/shards`) are used instead and nothing is downloaded.

A download is written to `<name>.part`, resumed with an HTTP Range request after a dropped connection,
and renamed to its final name only once it is complete and reads back as a parquet file with a `text`
column, so a half-written or corrupt shard is never used.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from raychat.common import UserError, base_data_dir, fsync_dir, fsync_file, get_data_dir, get_logger

CHARS_PER_SHARD = 250_000_000   # nanochat's shards hold ~250 M characters each
SHARD_MARGIN = 1.1              # fetch 10% more than the budget needs (nanochat: 240 shards for d20's ~216)
HF_HOST = "https://huggingface.co"

log = get_logger(__name__)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# ------------------------------------------------------------------------------------ where shards are

def local_shard_dir() -> Path | None:
    """RAYCHAT_DATA_DIR/pretrain/shards when RAYCHAT_DATA_DIR is set (offline runs, tests, CI)."""
    return get_data_dir("pretrain/shards")


def shard_paths(cfg, split: str = "train", download: bool = True) -> list[Path]:
    """The train shards (every shard but the last) or the validation shard (the last one).

    Offline (RAYCHAT_DATA_DIR) the local shards are used as they are; otherwise the shards the preset
    needs are downloaded into `base_data_dir()` first (when `download` is true).
    """
    if split not in ("train", "val"):
        raise UserError(f"unknown split '{split}': expected 'train' or 'val'")
    local = local_shard_dir()
    if local is not None:
        paths = _listed_shards(local)
        if len(paths) < 2:
            raise UserError(f"{local} holds {len(paths)} shard_*.parquet file(s): at least 2 are needed "
                            f"(train shards + the last one for validation)")
        return paths[-1:] if split == "val" else paths[:-1]
    directory = base_data_dir()
    if download:
        download_shards(cfg)
    present = {p.name: p for p in _listed_shards(directory)}
    val_name = shard_name(cfg.data.max_shard)
    if split == "val":
        if val_name not in present:
            raise UserError(f"validation shard {val_name} missing in {directory}: run `raychat data download`")
        return [present[val_name]]
    train = [p for name, p in sorted(present.items()) if name != val_name]
    if not train:
        raise UserError(f"no FineWeb-EDU train shards in {directory}: run `raychat data download`")
    return train


def _listed_shards(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("shard_*.parquet") if p.is_file())


# ---------------------------------------------------------------------------------------- reading

def iter_documents(paths, doc_cap: int | None = None) -> Iterator[str]:
    """Every document's text, in order: file by file, row group by row group (bounded memory)."""
    for path in paths:
        parquet = open_shard(path)
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist():
                yield text if doc_cap is None else text[:doc_cap]


def open_shard(path):
    """A `pyarrow.parquet.ParquetFile` with a string `text` column, or a UserError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path} is not a readable parquet file ({error}): delete it and download it again") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names or not (pa.types.is_string(schema.field("text").type)
                                          or pa.types.is_large_string(schema.field("text").type)):
        raise UserError(f"{path} has no string column 'text' (columns: {', '.join(schema.names)})")
    return parquet


def verify_shard(path, full: bool = True) -> bool:
    """True when `path` is a parquet file with a `text` column; `full` also decodes every row group,
    which catches damage inside the file that the footer alone would not show."""
    import pyarrow as pa
    try:
        parquet = open_shard(path)
        if full:
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group, columns=["text"])
        return True
    except (UserError, OSError, pa.ArrowException):
        return False


# ------------------------------------------------------------------------------------- downloading

def num_train_shards(cfg, tokens: int | None = None, chars_per_token: float | None = None,
                     cropped_fraction: float = 0.0) -> int:
    """Train shards a token budget needs: tokens / (1 - cropped_fraction) x chars/token / chars per shard,
    plus a margin. Best-fit packing drops the cropped tail of some documents (~35 % of the tokens at
    T=2048 in nanochat's measurement), so the shards must hold that much more text than the budget.

    The budget (`tokens`) defaults to num_iterations x total_batch_size when the horizon is fixed, else
    target_param_data_ratio x parameters (20 tokens per parameter, Chinchilla), as nanochat does;
    chars_per_token to `data.chars_per_token`. The pretraining preflight passes both measured on the
    actual tokenizer and shards (`raychat.data.pretrain.measure_packing`).
    """
    if cfg.data.num_shards >= 0:
        return min(cfg.data.num_shards, cfg.data.max_shard)
    if tokens is None:
        p = cfg.pretrain
        if p.num_iterations > 0:
            tokens = p.num_iterations * p.total_batch_size
        else:
            width, vocab = 64 * p.depth, cfg.tokenizer.vocab_size
            params = 2 * vocab * width + p.depth * 12 * width * width   # embedding + lm_head + blocks
            tokens = p.target_param_data_ratio * params
    kept = 1.0 - min(cropped_fraction, 0.95)
    chars = tokens / kept * (chars_per_token or cfg.data.chars_per_token)
    shards = math.ceil(chars / CHARS_PER_SHARD * SHARD_MARGIN)
    return max(1, min(shards, cfg.data.max_shard))


def base_url(cfg) -> str:
    """`data.base_url`, with the Hugging Face host replaced by HF_ENDPOINT when that is set (mirrors)."""
    url = cfg.data.base_url.rstrip("/")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    if endpoint and url.startswith(HF_HOST):
        url = endpoint + url[len(HF_HOST):]
    return url


class _Retryable(Exception):
    """A failure worth another attempt: dropped connection, 5xx/429, short or unreadable file."""


def download_shards(cfg, num_shards: int | None = None, directory: Path | None = None) -> list[Path]:
    """Fetch train shards 0..n-1 and the validation shard into `directory` (default base_data_dir()).

    Complete, readable files are skipped; anything else is (re)fetched in parallel with a progress bar.
    Returns the paths of all requested shards, train shards first.
    """
    import requests
    from tqdm import tqdm

    n = num_train_shards(cfg) if num_shards is None else num_shards
    if n < 0 or n > cfg.data.max_shard:
        raise UserError(f"--num-shards must be between 0 and {cfg.data.max_shard}, got {n}")
    directory = Path(directory or base_data_dir())
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(range(n)) + [cfg.data.max_shard]
    targets = [directory / shard_name(i) for i in indices]

    missing = []
    for path in targets:
        if path.exists() and verify_shard(path, full=False):
            continue
        if path.exists():
            log.warning("%s is truncated or corrupt: fetching it again", path)
            path.unlink()
        missing.append(path)
    if not missing:
        log.info("all %d shards already in %s", len(targets), directory)
        return targets

    url = base_url(cfg)
    session = requests.Session()
    with tqdm(total=len(missing), unit="shard", desc="FineWeb-EDU shards", dynamic_ncols=True) as bar:
        def fetch(path: Path) -> None:
            _download_one(session, f"{url}/{path.name}", path, cfg.data.download_retries,
                          cfg.data.download_backoff_s, cfg.data.download_timeout_s)
            bar.update(1)

        with ThreadPoolExecutor(max_workers=cfg.data.download_workers) as pool:
            for _ in pool.map(fetch, missing):   # re-raises the first failure
                pass
    return targets


def _download_one(session, url: str, path: Path, retries: int, backoff_s: float, timeout_s: float) -> None:
    part = path.with_name(path.name + ".part")
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", path.name, attempt, last_error, delay)
            time.sleep(delay)
        try:
            _fetch_into(session, url, part, timeout_s)
        except _Retryable as error:
            last_error = error
            continue
        except OSError as error:   # requests' connection errors are OSErrors too
            last_error = error
            continue
        if not verify_shard(part, full=True):
            # complete but unreadable: the bytes are wrong, so resuming would keep them; start over
            part.unlink(missing_ok=True)
            last_error = "downloaded file is not a parquet file with a 'text' column"
            continue
        fsync_file(part)
        os.replace(part, path)
        fsync_dir(path.parent)
        return
    raise UserError(f"could not download {url} after {retries + 1} attempts: {last_error}")


def _fetch_into(session, url: str, part: Path, timeout_s: float) -> None:
    """Append the rest of `url` to `part` (HTTP Range), or rewrite it when the server ignores ranges."""
    import requests
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            if response.status_code == 404:
                raise UserError(f"{url} not found (404): check data.base_url / HF_ENDPOINT and data.max_shard")
            if response.status_code == 416:   # our partial file is not a prefix of theirs: restart
                part.unlink(missing_ok=True)
                raise _Retryable("server refused the resume range")
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(f"HTTP {response.status_code}")
            response.raise_for_status()
            resumed = response.status_code == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)
                raise _Retryable("server answered a different range")
            offset = have if resumed else 0
            expected = response.headers.get("Content-Length")
            expected = offset + int(expected) if expected is not None else None
            with open(part, "ab" if resumed else "wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except requests.RequestException as error:
        raise _Retryable(f"{type(error).__name__}: {error}") from None
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _Retryable(f"got {size} of {expected} bytes")


# -------------------------------------------------------------------------------------------- CLI

def download_main(cfg, args) -> int:
    """`raychat data download [--num-shards N]`."""
    local = local_shard_dir()
    if local is not None:
        paths = shard_paths(cfg, "train") + shard_paths(cfg, "val")
        print(f"RAYCHAT_DATA_DIR is set: using the {len(paths)} local shards in {local}; nothing to download")
        return 0
    num = args.num_shards if getattr(args, "num_shards", None) is not None else num_train_shards(cfg)
    paths = download_shards(cfg, num)
    print(f"{len(paths) - 1} train shards + the validation shard ready in {paths[0].parent}")
    return 0
