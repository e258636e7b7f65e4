"""The stage registry and the jobs without Ray: every stage has its job script, the jobs run the CLI handlers
and say where their outputs went, a stamped stage is done exactly while its config, inputs and outputs
match, and the runtime env uploads the package but not the heavy directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raychat.config import load_config
from raychat.pipeline import STAGES, get_stage, stage_status

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = ["--set", "tokenizer.vocab_size=300", "--set", "tokenizer.max_chars=200000"]


def test_every_stage_has_a_job_script_that_names_it():
    for stage in STAGES:
        script = REPO / "jobs" / f"{stage.name}.py"
        assert script.is_file(), script
        assert f'job_main("{stage.name}")' in script.read_text()
    assert "speedrun" in (REPO / "jobs" / "speedrun.py").read_text()


def run_job(name: str, args: list[str], base: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAYCHAT_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tokenizer_job(tmp_path_factory, data_dir):
    """jobs/tokenizer.py run for real, as `ray job submit` would run it (a plain process without RAY_ADDRESS)."""
    base = tmp_path_factory.mktemp("jobs") / "raychat"
    done = run_job("tokenizer", ["--preset", "demo", *TOKENIZER], base)
    return base, done


def test_tokenizer_job_trains_and_says_where_outputs_went(tokenizer_job):
    base, done = tokenizer_job
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"tokenizer: outputs in\n  {base / 'tokenizer'}\n  {base / 'report' / 'tokenizer.json'}" in done.stdout
    assert json.loads((base / "report" / "tokenizer.json").read_text())["vocab_size"] == 300
    stamp = json.loads((base / "report" / "stages" / "tokenizer.json").read_text())
    assert stamp["config"]["tokenizer.vocab_size"] == 300 and stamp["seconds"] > 0
    assert stamp["outputs"]["fingerprint"] == json.loads((base / "tokenizer" / "bpe.json").read_text())["fingerprint"]


def test_a_stamped_stage_is_done_while_config_and_outputs_match(tokenizer_job, monkeypatch):
    base, _ = tokenizer_job
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(base))
    stage = get_stage("tokenizer")
    overrides = ["tokenizer.vocab_size=300", "tokenizer.max_chars=200000"]
    assert stage_status(stage, load_config("demo", overrides)).state == "done"
    # an operational field does not matter; one that decides the output does, and is named
    assert stage_status(stage, load_config("demo", overrides + ["tokenizer.num_threads=1"])).state == "done"
    changed = stage_status(stage, load_config("demo", ["tokenizer.vocab_size=400", "tokenizer.max_chars=200000"]))
    assert changed.state == "run" and "tokenizer.vocab_size 300 -> 400" in changed.reason
    # replaced outputs (another tokenizer in place) are not the ones the stamp vouches for
    bpe = base / "tokenizer" / "bpe.json"
    original = bpe.read_text()
    try:
        meta = json.loads(original)
        bpe.write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
        assert stage_status(stage, load_config("demo", overrides)).state == "run"
    finally:
        bpe.write_text(original)


def test_job_bad_input_is_one_line(tmp_path):
    done = run_job("base", ["--preset", "demo", "--set", "pretrain.depth=0"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "raychat: error: pretrain.depth must be >= 1 and <= 128, got 0"
    done = run_job("base_eval", ["--preset", "demo"], tmp_path)   # nothing trained in this base dir
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "no complete base checkpoint" in done.stderr


def test_runtime_env_uploads_the_package_but_not_heavy_directories():
    """Ray's own upload filter (the one `ray job submit --working-dir` applies) on this repository."""
    import yaml
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert {"RAYCHAT_BASE_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"} <= set(runtime_env["env_vars"])
    uploaded = []
    _dir_travel(REPO, [_get_excludes(REPO, runtime_env["excludes"])], uploaded.append, include_gitignore=False)
    names = {p.relative_to(REPO).as_posix() for p in uploaded if p.is_file()}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    package = [f for f in tracked if f.startswith(("raychat/", "serve/", "jobs/")) and (REPO / f).is_file()]
    assert package and set(package) <= names, sorted(set(package) - names)[:5]   # raychat/data/ included
    assert not any(n.startswith((".git/", ".venv/", "tokenizer_rust/target/")) for n in names)
