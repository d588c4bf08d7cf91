"""Entrypoint for `ray job submit`: the whole pipeline (synthesize -> train -> evaluate).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py --config my.yaml output_dir=s3://bucket/runs ray.storage_path=s3://bucket/ckpt

Inside a job Ray is already running (RAY_ADDRESS is set); the job joins it. The job runs in a
temporary copy of the working directory that Ray deletes afterwards, so outputs must go to
shared storage (an absolute path every node sees, or a URI); a relative output path is
refused. Arguments are those of `casseat run`; resubmitting the same command continues a run
that stopped.
"""

import sys

from casseat_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
