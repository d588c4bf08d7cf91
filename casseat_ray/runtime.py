"""Connecting to Ray the way the config says (local for tests and laptops, a cluster address
for `ray job submit`)."""

from __future__ import annotations

import logging
import os

from casseat_ray.config import RayConfig


def init_ray(cfg: RayConfig, quiet: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True)
    if quiet:
        kwargs.update(logging_level=logging.WARNING, log_to_driver=False)
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, **kwargs)
    if quiet:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
