"""Ray job: RL on GSM8K from the SFT model: rollout actors + the DeepSpeed learner.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/rl.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("rl"))
