"""Directories, offline data resolution, and the Ray helper."""
import subprocess
import sys
import textwrap

import pytest

from raychat import common


def test_base_dir_and_subfolders(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))
    assert common.get_base_dir() == tmp_path / "base" and (tmp_path / "base").is_dir()
    assert common.tokenizer_dir() == tmp_path / "base" / "tokenizer"
    assert common.checkpoint_dir("base", "r1") == tmp_path / "base" / "checkpoints" / "base" / "r1"
    assert common.checkpoint_dir("sft", "r1", "/mnt/shared") .as_posix() == "/mnt/shared/checkpoints/sft/r1"


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYCHAT_DATA_DIR", raising=False)
    assert common.get_data_dir("pretrain") is None
    monkeypatch.setenv("RAYCHAT_DATA_DIR", str(tmp_path))
    (tmp_path / "gsm8k").mkdir()
    assert common.get_data_dir("gsm8k") == tmp_path / "gsm8k"
    with pytest.raises(common.UserError, match="does not exist"):
        common.get_data_dir("nothing_here")


def test_device_and_dtype():
    assert common.detect_device() in ("cuda", "mps", "cpu")
    assert common.resolve_dtype("auto", "cpu") == "fp32"
    assert common.resolve_dtype("auto", "cuda") == "bf16"
    assert common.resolve_dtype("fp32", "cuda") == "fp32"


def test_init_ray_starts_a_loopback_node_and_shuts_it_down(tmp_path):
    # a fresh process: the session-wide Ray of other tests must not hide what init_ray does by itself
    script = textwrap.dedent("""
        import os
        os.environ.pop("RAY_ADDRESS", None)
        for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",):
            os.environ.pop(key, None)
        from raychat.common import init_ray
        ray = init_ray(object_store_memory=256 * 2**20)
        nodes = ray.nodes()
        assert len(nodes) == 1, nodes
        assert nodes[0]["NodeManagerAddress"] == "127.0.0.1", nodes[0]["NodeManagerAddress"]
        assert ray.cluster_resources()["CPU"] >= 4
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        ray.shutdown()
        assert not ray.is_initialized()
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
