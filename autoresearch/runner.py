"""
One run of train.py under the harness, and what its log says.

The run is `python -c "import prepare; prepare.attested_run('train.py')"` in a fresh folder holding only train.py
and prepare.py (run_in_folder, here and on a Ray node alike), in its own process group with a hard time limit; on
timeout or interrupt its whole process tree is killed (psutil). The driver reads the summary block after the last
`---` line, the latest progress line while it trains, and a crashed run's log tail, fenced for the agent.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from autoresearch import integrity
from autoresearch.console import log

LOG_TAIL_LINES, LOG_TAIL_CHARS = 50, 4000  # how much of a crashed run's log the agent sees
PROGRESS_EVERY = 30  # seconds between two status lines of a run when the output is not a terminal
TRAIN_COMMAND = "import prepare; prepare.attested_run('train.py')"  # the harness first, then train.py as __main__
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)  # kept from a run's env

# -----------------------------------------------------------------------------
# Running


def run_in_folder(train_source, prepare_source, key_hex, timeout, pid_path, split="val", log_path=None, cache=None,
                  env=None, check=None, on_start=None):
    """One run of train_source in a fresh folder, against the prepared cache (None: this machine's), evaluate_bpb
    scoring `split` and signing with key_hex; what the run leaves goes with the folder. check(prepare_py, cache)
    raises when the folder's harness is not the driver's (on a Ray node); on_start(process): the run has started.
    Returns returncode (None: killed at the limit), seconds, log, record (its text, or None), changed (of the
    harness)."""
    cache, root = Path(cache) if cache else integrity.cache_dir(), Path(tempfile.mkdtemp(prefix="autoresearch-run-"))
    work, record_path = root / "task", root / "record.json"  # the run works in task/; its record lies beside it
    work.mkdir()
    log_path = Path(log_path or work / "run.log")
    request = json.dumps({"record": str(record_path), "key": key_hex, **({"split": split} if split != "val" else {})})
    try:
        (work / "train.py").write_text(train_source)
        (work / "prepare.py").write_text(prepare_source)
        if check:
            check(work / "prepare.py", cache)
        before = integrity.harness_fingerprint(work / "prepare.py", cache)
        kept = {k: v for k, v in (env or os.environ).items() if not SECRET.search(k) and k not in ("PWD", "OLDPWD")}
        env = {**kept, "AUTORESEARCH_CACHE": str(cache)}  # train.py is code a model wrote: no key, token, password
        returncode, seconds = run_training(log_path, timeout, pid_path, request + "\n", work, env, on_start)
        changed = integrity.fingerprint_changes(before, integrity.harness_fingerprint(work / "prepare.py", cache))
        record = record_path.read_text() if record_path.exists() else None
        log_text = log_path.read_bytes().decode(errors="replace")  # keeps the \r of progress lines
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return dict(returncode=returncode, seconds=seconds, log=log_text, record=record, changed=changed)


def run_training(log_path, timeout, pid_path, request, cwd, env=None, on_start=None):
    """Run train.py under the harness in cwd, output to log_path, `request` (the attestation's key and path) on its
    stdin; kill its process tree on timeout or interrupt. Returns (exit code, or None when killed at the limit;
    seconds). pid_path (if any) names the run and its folder while it goes, for kill_leftover_training."""
    started = time.time()
    own_group = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", TRAIN_COMMAND], stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE, cwd=cwd, env=env, **own_group)
    if pid_path:
        pid_path.write_text(f"{process.pid}\n{cwd}")
    if on_start:
        on_start(process)
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
        if pid_path:
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
    """A driver killed with SIGKILL leaves its train.py running, and its folder: stop it and remove that."""
    try:
        pid, folder = (pid_path.read_text().splitlines() + ["", ""])[:2]
    except FileNotFoundError:
        return
    try:
        process = psutil.Process(int(pid))
        # the run this file names: started before the file was written (a recycled pid is younger), and ours
        if process.create_time() <= pid_path.stat().st_mtime + 1 and TRAIN_COMMAND in " ".join(process.cmdline()):
            log(f"killing train.py (pid {pid}) left running by the previous driver")
            kill_tree(int(pid))
    except (ValueError, psutil.Error):
        pass
    if Path(folder).parent.name.startswith("autoresearch-run-"):  # its task folder and record
        shutil.rmtree(Path(folder).parent, ignore_errors=True)
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


def fence_untrusted(text, kind="program-output"):
    # A random tag the text cannot know, so it cannot close the fence early.
    tag = f"untrusted-{kind}-{secrets.token_hex(4)}"
    return f"<{tag}>\n{text}\n</{tag}>"
