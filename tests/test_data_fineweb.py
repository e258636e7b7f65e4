"""FineWeb shards: offline lookup, document order, and the download path against a flaky local HTTP server."""
import http.server
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raychat.common import UserError
from raychat.config import load_config
from raychat.data import fineweb
from raychat.data.fineweb import download_shards, iter_documents, num_train_shards, shard_paths

REPO_PATH = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


# ------------------------------------------------------------------------------------ offline

def test_offline_shards_split_train_and_val(data_dir):
    cfg = load_config("demo")
    train, val = shard_paths(cfg, "train"), shard_paths(cfg, "val")
    shards = sorted((data_dir / "pretrain" / "shards").glob("shard_*.parquet"))
    assert train == shards[:-1] and val == shards[-1:]
    with pytest.raises(UserError, match="unknown split"):
        shard_paths(cfg, "test")


def test_iter_documents_in_order_with_cap(data_dir):
    val = shard_paths(load_config("demo"), "val")
    expected = pq.read_table(val[0], columns=["text"]).column("text").to_pylist()
    assert list(iter_documents(val)) == expected
    capped = list(iter_documents(val, doc_cap=50))
    assert capped == [text[:50] for text in expected] and max(map(len, capped)) == 50
    # several files and row groups: file order, then row-group order
    train = shard_paths(load_config("demo"), "train")
    docs = iter_documents(train)
    first_file = pq.read_table(train[0], columns=["text"]).column("text").to_pylist()
    assert [next(docs) for _ in range(len(first_file))] == first_file
    assert next(docs) == pq.read_table(train[1], columns=["text"]).column("text")[0].as_py()


def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    cfg = load_config("demo")
    monkeypatch.setenv("RAYCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        shard_paths(cfg)
    (tmp_path / "pretrain" / "shards").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2 are needed"):
        shard_paths(cfg)
    # no offline data and nothing downloaded: point at `raychat data download`
    monkeypatch.delenv("RAYCHAT_DATA_DIR")
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))
    with pytest.raises(UserError, match="raychat data download"):
        shard_paths(cfg, "train", download=False)
    with pytest.raises(UserError, match="raychat data download"):
        shard_paths(cfg, "val", download=False)


def test_shard_count_follows_the_token_budget():
    d20 = load_config("d20")
    # 561 M params x 20 tokens x 4.8 chars / 250 M chars per shard = 216 shards, + 10% margin (nanochat: 240)
    assert 216 < num_train_shards(d20) <= 240
    assert num_train_shards(load_config("d26")) > num_train_shards(d20)
    fixed = load_config("d20", ["pretrain.num_iterations=1000"])   # 1000 x 524,288 tokens
    assert num_train_shards(fixed) == 12
    assert num_train_shards(load_config("d20", ["data.num_shards=3"])) == 3
    assert num_train_shards(load_config("demo")) == 2


# ------------------------------------------------------------------------------ flaky HTTP server

class FlakyShardServer:
    """Serves shard files over HTTP with Range support; `faults[name]` is a list of what the next
    requests for that file get: "500", "drop" (headers for the whole file, half the bytes, then the
    connection closes), "garbage" (a complete 200 response that is not parquet) or "404"."""

    def __init__(self, files: dict[str, bytes], prefix: str):
        self.files, self.prefix, self.faults, self.log = files, prefix, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.log.append((name, rng, time.monotonic()))
                if not self.path.startswith(server.prefix + "/") or name not in server.files:
                    self.send_error(404)
                    return
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                data = server.files[name]
                if fault in ("500", "404"):
                    self.send_error(int(fault))
                    return
                if fault == "garbage":
                    data = b"this is not a parquet file" * 1000
                start = int(rng.split("=")[1].split("-")[0]) if rng and fault != "garbage" else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if fault == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def requests_for(self, name):
        return [(rng, t) for n, rng, t in self.log if n == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_server(data_dir):
    """The offline shards as a 3-train-shard mirror (shard_00000-00002) + validation shard_00003."""
    src = sorted((data_dir / "pretrain" / "shards").glob("shard_*.parquet"))
    files = {f"shard_{i:05d}.parquet": p.read_bytes() for i, p in enumerate([src[0], src[1], src[0]])}
    files["shard_00003.parquet"] = src[2].read_bytes()
    server = FlakyShardServer(files, REPO_PATH)
    yield server
    server.close()


@pytest.fixture
def download_cfg(shard_server, monkeypatch, tmp_path):
    monkeypatch.delenv("RAYCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{shard_server.port}")   # the default base_url's host
    return load_config("demo", ["data.max_shard=3", "data.num_shards=2", "data.download_backoff_s=0.2",
                                "data.download_retries=3", "data.download_workers=2"])


def test_download_retries_resumes_and_verifies(download_cfg, shard_server, tmp_path):
    shard_server.faults = {"shard_00000.parquet": ["500", "500"], "shard_00001.parquet": ["drop", "drop"],
                           "shard_00003.parquet": ["garbage"]}
    paths = shard_paths(download_cfg, "train") + shard_paths(download_cfg, "val")
    directory = tmp_path / "base" / "base_data"
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"]
    for path in paths:
        assert path.parent == directory and path.read_bytes() == shard_server.files[path.name]
    assert not list(directory.glob("*.part"))
    assert not (directory / "shard_00002.parquet").exists()      # the preset asked for 2 train shards

    # 500, 500, then success: retried with exponential backoff (0.2 s, then 0.4 s)
    times = [t for _, t in shard_server.requests_for("shard_00000.parquet")]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4
    # dropped twice mid-file: each retry asks only for the bytes it does not have yet
    ranges = [rng for rng, _ in shard_server.requests_for("shard_00001.parquet")]
    size = len(shard_server.files["shard_00001.parquet"])
    assert ranges[0] is None and len(ranges) == 3
    starts = [int(rng[len("bytes="):-1]) for rng in ranges[1:]]
    assert 0 < starts[0] <= size // 2 < starts[1] < size   # what arrived before the drop is kept
    # a complete response that is not parquet is thrown away and fetched again from the start
    assert [rng for rng, _ in shard_server.requests_for("shard_00003.parquet")] == [None, None]


def test_complete_files_skipped_corrupt_ones_refetched(download_cfg, shard_server, tmp_path):
    directory = tmp_path / "base" / "base_data"
    download_shards(download_cfg)
    first_log = len(shard_server.log)
    assert first_log == 3
    download_shards(download_cfg)
    assert len(shard_server.log) == first_log                 # everything complete: nothing fetched
    # a truncated final file (e.g. copied by hand) and a stale .part are never used
    good = shard_server.files["shard_00001.parquet"]
    (directory / "shard_00001.parquet").write_bytes(good[: len(good) // 3])
    (directory / "shard_00001.parquet.part").write_bytes(b"x" * 5000)
    (directory / "shard_00000.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    download_shards(download_cfg)
    assert (directory / "shard_00001.parquet").read_bytes() == good
    assert (directory / "shard_00000.parquet").read_bytes() == shard_server.files["shard_00000.parquet"]
    assert not list(directory.glob("*.part"))
    fetched = [(name, rng) for name, rng, _ in shard_server.log[first_log:]]
    assert sorted(fetched, key=str) == sorted([("shard_00000.parquet", None),
                                               # resumed after the stale .part, failed verification,
                                               # then fetched again from the start
                                               ("shard_00001.parquet", "bytes=5000-"),
                                               ("shard_00001.parquet", None)], key=str)


def test_download_gives_up_with_a_clear_error(download_cfg, shard_server, tmp_path):
    shard_server.faults = {"shard_00003.parquet": ["garbage"] * 10}
    with pytest.raises(UserError, match=r"could not download .*shard_00003.parquet after 4 attempts"):
        download_shards(download_cfg)
    directory = tmp_path / "base" / "base_data"
    assert not (directory / "shard_00003.parquet").exists() and not list(directory.glob("*.part"))
    # a wrong mirror: 404 is not retried
    cfg = load_config("demo", ["data.max_shard=9", "data.num_shards=0", "data.download_backoff_s=5"])
    start = time.monotonic()
    with pytest.raises(UserError, match="not found"):
        download_shards(cfg)
    assert time.monotonic() - start < 4


def test_base_url_and_hf_endpoint(monkeypatch):
    cfg = load_config("demo")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert fineweb.base_url(cfg) == "https://huggingface.co" + REPO_PATH
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert fineweb.base_url(cfg) == "https://hf-mirror.example" + REPO_PATH
    cfg.data.base_url = "https://my.mirror/shards/"     # a non-HF mirror is used as given
    assert fineweb.base_url(cfg) == "https://my.mirror/shards"


def test_cli_download(download_cfg, shard_server, tmp_path, data_dir):
    env_base = {"PATH": "/usr/bin:/bin", "RAYCHAT_BASE_DIR": str(tmp_path / "base"),
                "HF_ENDPOINT": f"http://127.0.0.1:{shard_server.port}"}
    cmd = [sys.executable, "-m", "raychat.cli", "data", "download", "--preset", "demo",
           "--set", "data.max_shard=3", "--num-shards", "1"]
    done = subprocess.run(cmd, env=env_base, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "base" / "base_data").iterdir()) == [
        "shard_00000.parquet", "shard_00003.parquet"]
    offline = subprocess.run(cmd, env={**env_base, "RAYCHAT_DATA_DIR": str(data_dir)}, capture_output=True,
                             text=True, timeout=120)
    assert offline.returncode == 0 and "nothing to download" in offline.stdout
    bad = subprocess.run(cmd[:-1] + ["5000"], env=env_base, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-shards must be between 0 and 3" in bad.stderr
