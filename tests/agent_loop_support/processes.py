"""Looking at processes from the tests, portably (psutil, no /proc)."""

import time

import psutil


def alive(pid, wait=5.0):
    """Whether the process still runs after up to `wait` seconds (a zombie counts as dead; pid None: it has ended)."""
    if pid is None:
        return False
    deadline = time.time() + wait
    while True:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            return False
        if status == psutil.STATUS_ZOMBIE or time.time() > deadline:
            return status != psutil.STATUS_ZOMBIE
        time.sleep(0.05)
