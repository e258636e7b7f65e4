"""Ray job: train the BPE tokenizer.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/tokenizer.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("tokenizer"))
