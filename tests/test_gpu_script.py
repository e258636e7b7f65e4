"""bench/gpu.sh, the one prepared script for a lent GPU machine, runs end to end on CPU (--dry-run):
the same DeepSpeed backend, compile (aot_eager), chunked loss, checkpoint round trip and decoding."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_script_dry_run_prints_its_json_and_resumes_exactly(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "RAYCHAT_BASE_DIR": str(tmp_path / "base")}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--out", str(out), "--tmp", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    assert result["backend"] == "deepspeed" and result["device"] == "cpu (dry run)"
    assert result["grad_accum"] == 2 and result["tokens_per_s"] > 0 and 0 <= result["mfu"] < 1
    assert result["compile_scope"] == {"eval_frames_compiled": 0, "graphs_added_after_eval": False}
    resume = result["resume"]
    assert resume["loss_after_save"] == resume["loss_after_resume"] and resume["weights_max_rel_diff"] == 0.0
    assert result["decode_tok_s_1"] > 0 and result["decode_tok_s_8"] > 0
