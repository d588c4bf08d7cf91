"""A local Ray ends with the run that started it, also when that run is killed.

``ray.init`` ties the GCS and the raylet to the driver, so they die with it, but Ray's own
agents (dashboard agent, runtime-env agent) outlive a driver killed with SIGKILL by a minute
or more: they first try to report the raylet's death to the GCS that died with it. The run
starts this watcher beside a local Ray (``start``); it notes the driver's descendants every
second and, once the driver is gone, kills those still alive.

    python -m casseat_ray.reaper <driver pid>
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

INTERVAL_S = 1.0


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between the two questions
        return False


def watch(driver: int, interval: float = INTERVAL_S) -> int:
    """Wait for process ``driver`` to end, then kill what is left of its descendants; returns
    how many it killed."""
    import psutil

    try:
        parent = psutil.Process(driver)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, psutil.Process] = {}
    while _alive(parent):
        try:
            # a Process remembers its start time: a pid reused later is never killed
            seen.update((p.pid, p) for p in parent.children(recursive=True) if p.pid != os.getpid())
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    killed = 0
    for p in filter(_alive, seen.values()):
        try:
            p.kill()
            killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


def start() -> subprocess.Popen:
    """The watcher of this process, in a session of its own (a signal to the driver's process
    group does not end it before it has done its work)."""
    return subprocess.Popen([sys.executable, "-m", "casseat_ray.reaper", str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
