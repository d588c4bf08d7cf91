"""Entrypoint for `ray job submit`: student LoRA training on Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny-cpu.yaml

Arguments are those of `casseat train` (add --resume to continue a killed run).
"""

import sys

from casseat_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
