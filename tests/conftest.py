"""Shared fixtures. Ray's environment is set before anything imports Ray (docs/ray_and_deepspeed.md)."""
import os

from raychat.common import LOCAL_RAY_ENV

for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline datasets (RAYCHAT_DATA_DIR; CI points it at ../shared/data)."""
    root = os.environ.get("RAYCHAT_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.fail("RAYCHAT_DATA_DIR must point at the offline datasets (see README)")
    return Path(root)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """monkeypatch for module-scoped fixtures (the Ray training runs each test module shares)."""
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for the whole session, on 127.0.0.1, 4 logical CPUs on 2 cores."""
    os.environ.setdefault("RAYCHAT_BASE_DIR", str(tmp_path_factory.mktemp("raychat_base")))
    from raychat.common import init_ray
    ray = init_ray(num_cpus=4, object_store_memory=512 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    """A small real tokenizer (vocab 1024) trained on ~1.5 M characters of the offline shards, once per session."""
    from raychat.data.fineweb import iter_documents
    from raychat.tokenizer import RustBPETokenizer

    def texts(budget=1_500_000):
        for text in iter_documents(sorted((data_dir / "pretrain" / "shards").glob("*.parquet"))[:-1], doc_cap=10_000):
            yield text
            budget -= len(text)
            if budget <= 0:
                return

    return RustBPETokenizer.train_from_iterator(texts(), 1024)
