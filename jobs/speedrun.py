"""Ray job: every stage in order, resumable (skips finished stages, continues an interrupted one), then the
report card.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/speedrun.py --preset d20
"""
import sys

from raychat.cli import main

if __name__ == "__main__":
    sys.exit(main(["speedrun", *sys.argv[1:]]))
