"""The watcher beside a local Ray: once its driver is gone, the driver's descendants go too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from casseat_ray import reaper

# a driver that starts a grandchild in a session of its own (as Ray's agents run), then waits
DRIVER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def test_the_descendants_of_a_killed_driver_are_killed_and_nothing_else():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        deadline = time.time() + 30
        while not psutil.Process(driver.pid).children() and time.time() < deadline:
            time.sleep(0.1)
        (child,) = psutil.Process(driver.pid).children()
        killed = []
        watcher = threading.Thread(target=lambda: killed.append(reaper.watch(driver.pid, interval=0.1)))
        watcher.start()
        time.sleep(0.5)  # the watcher has seen the child
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        watcher.join(timeout=10)
        assert killed == [1]
        child.wait(timeout=10)  # gone, not orphaned
        assert bystander.poll() is None  # a process outside the driver's tree is left alone
    finally:
        for p in (driver, bystander):
            p.kill()
            p.wait()
