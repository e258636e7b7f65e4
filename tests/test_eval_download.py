"""The CORE eval bundle download, against a real HTTP server on 127.0.0.1 serving a zip built here from
the offline files: atomic extraction, resume of a partial download, and clear errors for bad zips."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evalkit import small_bundle
from raychat.common import UserError
from raychat.config import load_config
from raychat.eval.core import download_bundle, locate_bundle, present_and_missing


class BundleServer:
    """Serves `files` {path: bytes}; honours `Range: bytes=N-` when `ranges` is set; records requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.drop_after: int | None = None  # cut the first response after this many bytes
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and server.ranges:
                    start = int(range_header.split("=")[1].rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.drop_after is not None:
                    self.wfile.write(body[start:server.drop_after])
                    server.drop_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


def make_zip(root: Path, prefix: str = "eval_bundle/", skip: str | None = None, padding: int = 0) -> bytes:
    """A zip laid out like nanochat's eval_bundle.zip (stored, so a flipped byte breaks a CRC)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != skip:
                archive.write(path, prefix + path.relative_to(root).as_posix())
        if padding:
            archive.writestr(prefix + "padding.bin", os.urandom(padding))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundle_root(data_dir, tmp_path_factory) -> Path:
    return small_bundle(data_dir, tmp_path_factory.mktemp("zip") / "src", gzipped=False, rows=20)


@pytest.fixture(scope="module")
def bundle_zip(bundle_root) -> bytes:
    return make_zip(bundle_root)


def assert_complete(dest: Path):
    assert (dest / "core.yaml").is_file()
    present, missing = present_and_missing(dest)
    assert [t.label for t, _ in present] == ["copa", "arc_easy", "winograd", "bigbench_operators"]
    assert [t.label for t in missing] == ["hellaswag"]
    leftovers = [p.name for p in dest.parent.iterdir() if p.name not in ("eval_bundle", ".eval_bundle.lock")]
    assert leftovers == []   # no .part, no temp extraction dir


def test_download_extracts_atomically_into_place(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip
    dest = download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle")
    assert_complete(dest)
    assert (dest / "eval_data/commonsense_reasoning/copa.jsonl").read_text().count("\n") == 20


def test_locate_bundle_downloads_once_when_offline_data_is_not_set(server, bundle_zip, tmp_path, monkeypatch):
    monkeypatch.delenv("RAYCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))
    server.files["/b.zip"] = bundle_zip
    cfg = load_config("demo", [f"eval.bundle_url={server.url('/b.zip')}"])
    assert locate_bundle(cfg) == tmp_path / "eval_bundle"
    assert locate_bundle(cfg) == tmp_path / "eval_bundle"
    assert len(server.requests) == 1
    assert_complete(tmp_path / "eval_bundle")


def test_locate_bundle_uses_the_offline_copy(data_dir):
    assert locate_bundle(load_config("demo")) == (data_dir / "core_eval").resolve()


def test_partial_download_resumes_with_a_range_request(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip
    (tmp_path / "eval_bundle.zip.part").write_bytes(bundle_zip[:5000])
    dest = download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle")
    assert server.requests == [("/eval_bundle.zip", "bytes=5000-")]
    assert_complete(dest)


def test_a_dropped_connection_is_retried_and_resumed(server, bundle_root, tmp_path):
    server.files["/eval_bundle.zip"] = make_zip(bundle_root, padding=400_000)
    server.drop_after = 300_000
    dest = download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle")
    (first, first_range), (second, second_range) = server.requests
    assert first_range is None
    resumed_at = int(second_range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 300_000   # what arrived before the drop was kept
    assert_complete(dest)


def test_server_without_ranges_restarts_from_zero(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip
    server.ranges = False
    (tmp_path / "eval_bundle.zip.part").write_bytes(b"garbage from an older download")
    dest = download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle")
    assert_complete(dest)


@pytest.mark.parametrize("damage, message", [
    (lambda z: z[:len(z) // 2] + bytes([z[len(z) // 2] ^ 0xFF]) + z[len(z) // 2 + 1:], "is corrupt"),
    (lambda z: b"<html>Access denied</html>", "not a valid zip"),
])
def test_a_damaged_zip_is_rejected_and_nothing_is_left(server, bundle_zip, tmp_path, damage, message):
    server.files["/eval_bundle.zip"] = damage(bundle_zip)
    with pytest.raises(UserError, match=message):
        download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval_bundle.lock"]


def test_zip_without_the_task_list_is_rejected(server, data_dir, tmp_path):
    root = small_bundle(data_dir, tmp_path / "src", gzipped=False, rows=2)
    server.files["/z.zip"] = make_zip(root, skip="core.yaml")
    with pytest.raises(UserError, match="no core.yaml"):
        download_bundle(server.url("/z.zip"), tmp_path / "out" / "eval_bundle")
    assert not (tmp_path / "out" / "eval_bundle").exists()


def test_checksum_and_http_errors(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip
    with pytest.raises(UserError, match="sha256"):
        download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle", sha256="0" * 64)
    good = hashlib.sha256(bundle_zip).hexdigest()
    assert_complete(download_bundle(server.url("/eval_bundle.zip"), tmp_path / "eval_bundle", sha256=good))
    with pytest.raises(UserError, match="HTTP 404"):   # not retried: a 404 will not change
        download_bundle(server.url("/missing.zip"), tmp_path / "other" / "eval_bundle", retries=3)
    assert [path for path, _ in server.requests].count("/missing.zip") == 1
