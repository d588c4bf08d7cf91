"""Entrypoint for `ray job submit`: the evaluation job.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/tiny-cpu.yaml

Inside a job Ray is already running (RAY_ADDRESS is set); the job joins it. Arguments are
those of `casseat evaluate`.
"""

import sys

from casseat_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
