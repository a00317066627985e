"""
The folders runs work in on this machine, and what a killed driver leaves there.

- Every run's folder is in runs_folder(), your user's alone, which each run's sandbox denies whole.
- A run's folder holds a lock (flock) its driver keeps while the run goes: the folders of a driver or a Ray worker
  that was killed are found by their free lock, what still runs in them killed, and removed (remove_abandoned).
- A resumed driver also stops the run its pid file names (kill_leftover_training).
"""

import functools
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import psutil

from autoresearch.console import log

RUN_LOCK = ".driver.lock"  # in each run's folder, held by the process that runs it

# -----------------------------------------------------------------------------
# Where runs work


@functools.cache
def runs_folder():
    """The folder of every run's folder on this machine, your user's alone: each run's sandbox denies it whole, so no
    run reads another's folder, also one that runs beside it or starts after it. One of this process's own when the
    shared one is not a folder of yours that only you can open."""
    folder = Path(tempfile.gettempdir()) / f"autoresearch-runs-{os.getuid() if hasattr(os, 'getuid') else 0}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        status = os.lstat(folder)
        if stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o077:
            return folder
    except (OSError, AttributeError):
        pass
    return Path(tempfile.mkdtemp(prefix="autoresearch-runs-"))


def new_run_folder():
    """A run's folder in runs_folder(), and the lock this process holds on it while the run goes (flock: it dies
    with the process). The folders of a driver that was killed (or of a Ray worker) are found so and removed first,
    with what still runs in them (remove_abandoned)."""
    import fcntl  # POSIX: the loop does not run on Windows (agent_loop.py says so)

    remove_abandoned()
    root = Path(tempfile.mkdtemp(prefix="autoresearch-run-", dir=runs_folder()))
    lock = open(root / f"{RUN_LOCK}.new", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(root / f"{RUN_LOCK}.new", root / RUN_LOCK)  # only once held: a lock found free is one of the dead
    return root, lock


def remove_abandoned():
    """Kill what runs in a run folder whose lock no process holds, and remove the folder."""
    import fcntl

    abandoned = []
    for folder in runs_folder().glob("autoresearch-run-*"):
        try:
            with open(folder / RUN_LOCK) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (its driver lives), or none yet
            continue
        abandoned.append(str(folder))
    if not abandoned:
        return
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info["cwd"] or ""
        if any(cwd == folder or cwd.startswith(folder + os.sep) for folder in abandoned):
            log(f"killing pid {process.pid}, left running in {cwd} by a driver that was killed")
            kill_tree(process.pid)
    for folder in abandoned:
        remove_folder(Path(folder))


def remove_folder(path):
    """Remove what a run left, also what it made unwritable (Landlock does not govern chmod) or nested past Python's
    recursion limit: never raises, a folder left behind is not worth a night."""
    def writable_again(function, name, _):
        for folder in (os.path.dirname(name), name):
            try:
                if not os.path.islink(folder):  # never what a link names
                    os.chmod(folder, 0o700)
            except OSError:
                pass
        try:
            function(name) if function in (os.unlink, os.rmdir) else shutil.rmtree(name, ignore_errors=True)
        except (OSError, RecursionError):
            pass

    try:
        shutil.rmtree(path, onerror=writable_again)
    except (OSError, RecursionError):
        pass


# -----------------------------------------------------------------------------
# What a killed driver leaves


def kill_tree(pid):
    """Kill a process and every process it started (data loader workers, compile workers), at once: also those
    left in its process group after it ended."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if os.name == "posix":  # also what left the tree but kept the run's process group
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=5)


def kill_leftover_training(pid_path):
    """A driver killed with SIGKILL leaves its train.py and scorer running, and their folder: stop them, remove it."""
    try:
        train_pid, folder, scorer_pid = (pid_path.read_text().splitlines() + ["", "", ""])[:3]
    except FileNotFoundError:
        return
    root = Path(folder).parent
    for pid in (train_pid, scorer_pid):
        try:
            process = psutil.Process(int(pid))
            # the run this file names: started before the file was written (a recycled pid is younger), in its folder
            if (process.create_time() <= pid_path.stat().st_mtime + 1
                    and Path(process.cwd()).parent == root and root.name.startswith("autoresearch-run-")):
                log(f"killing {'train.py' if pid == train_pid else 'the scorer'} (pid {pid}) left running by the "
                    "previous driver")
                kill_tree(int(pid))
        except (ValueError, psutil.Error, OSError):
            pass
    if root.name.startswith("autoresearch-run-"):  # its folders, log and record
        remove_folder(root)
    pid_path.unlink(missing_ok=True)
