"""Ray job: serve the chat model (API + web UI) until the job is stopped.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/serve.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("serve"))
