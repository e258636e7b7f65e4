"""Ray job: download the FineWeb-EDU shards.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/data.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("data"))
