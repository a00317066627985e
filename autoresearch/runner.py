"""
One run of train.py under the harness, and what its log says.

The run is `python -c "import prepare; prepare.attested_run('train.py')"` in the repository: the
harness first, train.py as __main__. It gets its own process group and a hard time limit; on
timeout or interrupt its whole process tree is killed (psutil: portable, no /proc). The driver
reads the summary block after the last `---` line for the memory figure and the printed val_bpb
(which must agree with the harness's attested one), shows one status line while it trains, and
sends a crashed run's log tail to the agent fenced as untrusted data.
"""

import datetime
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

import psutil

from autoresearch.console import log

LOG_TAIL_LINES, LOG_TAIL_CHARS = 50, 4000  # how much of a crashed run's log the agent sees
PROGRESS_EVERY = 30  # seconds between two status lines of a run when the output is not a terminal
TRAIN_COMMAND = "import prepare; prepare.attested_run('train.py')"  # the harness first, then train.py as __main__

# -----------------------------------------------------------------------------
# Running


def run_training(log_path, timeout, pid_path, request, cwd=None, env=None):
    """Run train.py under the harness, output to log_path, `request` (the attestation's key and path) on its stdin;
    kill its process tree on timeout or interrupt. Returns (exit code, or None when killed at the limit; seconds).
    cwd and env: where it runs and with what environment (default: this process's; a Ray task gives its own)."""
    started = time.time()
    own_group = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", TRAIN_COMMAND], stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE, cwd=cwd, env=env, **own_group)
    pid_path.write_text(str(process.pid))
    timed_out = threading.Event()
    # A timer, not wait(timeout): that polls, and returns up to 50 ms after the run ends
    timer = threading.Timer(timeout, lambda: (timed_out.set(), kill_tree(process.pid)))
    timer.start()
    try:
        try:
            process.stdin.write(request.encode())
            process.stdin.close()
        except BrokenPipeError:
            pass  # it ended before reading: its exit code says why
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted: Ctrl-C, SIGTERM
            kill_tree(process.pid)
            process.wait()
        pid_path.unlink(missing_ok=True)
    return (None if timed_out.is_set() else returncode), time.time() - started


def kill_tree(pid):
    """Kill a process and every process it started (data loader workers, compile workers), at once."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return  # it has just ended
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
    """A driver killed with SIGKILL leaves its train.py running: stop it before starting another."""
    try:
        pid = int(pid_path.read_text())
        process = psutil.Process(pid)
        # the run this file names: started before the file was written (a recycled pid is younger), and ours
        if process.create_time() <= pid_path.stat().st_mtime + 1 and TRAIN_COMMAND in " ".join(process.cmdline()):
            log(f"killing train.py (pid {pid}) left running by the previous driver")
            kill_tree(pid)
    except (FileNotFoundError, ValueError, psutil.Error):
        pass
    pid_path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Reading the log


def visible_lines(log_text):
    """The log's lines as a terminal shows them: of a line rewritten with \\r, only its last version."""
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in log_text.split("\n")]


def parse_summary(log_text):
    """The `key: number` lines after the last `---` line of the log."""
    lines = visible_lines(log_text)
    if "---" not in lines:
        return {}
    block = lines[len(lines) - lines[::-1].index("---"):]
    metrics = {}
    for line in block:
        match = re.fullmatch(r"(\w+):\s+(\S+)\s*", line)
        if match:
            try:
                metrics[match[1]] = float(match[2])
            except ValueError:
                pass
    return metrics


def log_tail(log_text):
    """The last lines of a log as the agent sees them: progress lines collapsed, size-capped."""
    lines = visible_lines(log_text.rstrip("\n"))
    return "\n".join(lines[-LOG_TAIL_LINES:])[-LOG_TAIL_CHARS:]


def run_status(log_path):
    """The run's latest progress line, shortened: "step 42 (45.1%), loss 4.1234, 16s left", or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    steps = [line for line in visible_lines(tail) if line.startswith("step ")]
    if not steps:
        return None
    found = re.match(r"step (\d+) \(([\d.]+)%\) \| loss: ([\d.]+)(?:.*remaining: (\d+)s)?", steps[-1])
    if not found:  # train.py was edited: its own words, cut short
        return " ".join(steps[-1].split())[:100]
    step, percent, loss, left = found.groups()
    return f"step {int(step)} ({percent}%), loss {float(loss):.4f}" + (f", {left}s left" if left else "")


def show_progress(log_path, label, stop):
    """Until `stop` is set: the run's progress as one status line, rewritten in place on a terminal, printed every
    PROGRESS_EVERY seconds otherwise (a redirected log gets a line now and then, not a flood)."""
    tty, shown, printed = sys.stdout.isatty(), "", time.time()
    while not stop.wait(min(1.0, PROGRESS_EVERY)):
        status = run_status(log_path)
        if status and tty:
            line = f"{datetime.datetime.now():%H:%M:%S} {label} {status}"
            print("\r" + line.ljust(len(shown)), end="", flush=True)
            shown = line
        elif status and time.time() - printed >= PROGRESS_EVERY:
            log(f"{label} {status}")
            printed = time.time()
    if shown:
        print("\r" + " " * len(shown) + "\r", end="", flush=True)


def fence_untrusted(text, kind="program-output"):
    # A random tag the text cannot know, so it cannot close the fence early.
    tag = f"untrusted-{kind}-{secrets.token_hex(4)}"
    return f"<{tag}>\n{text}\n</{tag}>"
