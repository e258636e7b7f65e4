"""Ray job: bits-per-byte and CORE of the base model.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/base_eval.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("base_eval"))
