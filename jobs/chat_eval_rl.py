"""Ray job: chat evaluation (ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE) of the rl model.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/chat_eval_rl.py --preset d20 [--set ...]
"""
import sys

from raychat.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main("chat_eval_rl"))
