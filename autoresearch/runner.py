"""
One run of train.py under the harness.

The run is `python train.py` in a fresh folder holding only train.py and prepare.py, and beside it the scorer
(scorer.py, in a folder of its own with the driver's harness), which alone reads the validation data, computes
val_bpb and signs its record (run_in_folder, here and on a Ray node alike); then, when the scorer asks, the probe
run, train.py again in a folder of its own. train.py runs in this machine's sandbox (sandbox.py). Each process
runs in its own process group with a hard time limit; on timeout or interrupt the run's whole process tree is
killed (psutil). Where runs work is run_folders.py's, what their log says run_log.py's.
"""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

from autoresearch import integrity, run_folders, run_log, sandbox, state

PROGRESS_EVERY = 30  # seconds between two status lines of a run when the output is not a terminal
SCORER_FD = "AUTORESEARCH_SCORER_FD"  # names train.py's end of the socket to the scorer (prepare.SCORER_FD)
SCORER_GRACE = 30  # seconds the scorer may take to write its record once train.py has ended
SAVE_WEIGHTS, LOAD_WEIGHTS = "AUTORESEARCH_SAVE_WEIGHTS", "AUTORESEARCH_LOAD_WEIGHTS"  # as prepare.py names them
WEIGHTS_FILE = "model.safetensors"  # where in its folder the harness saves the model it scored, when asked
WEIGHTS_LIMIT = 16 << 30  # bytes of weights the scorer keeps (a 4B-parameter model in fp32); a bigger file is refused
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)  # kept from a run's env

# -----------------------------------------------------------------------------
# Running


def run_in_folder(train_source, harness, key_hex, timeout, pid_path, split="val", log_path=None, cache=None,
                  env=None, check=None, on_start=None, weights=None, load=None, compiled=None, keep_compiled=False):
    """One run of train_source in a fresh folder, against the prepared cache (None: this machine's), the scorer
    scoring `split` and signing with key_hex; then, when the scorer asks, the probe run: train_source again, in a
    folder made anew, loading the weights the first run handed over and scoring the spliced copies of its rows.
    What the runs leave goes with the folder. harness: {name: source} of prepare.py and scorer.py.
    check(prepare_py, cache) raises when the folder's harness is not the driver's (on a Ray node); on_start(process):
    the run has started. weights: where the weights of the model it scored go; load: weights the harness loads into
    the model instead of training it. compiled: the tag's compile cache, which each run starts from, in its own
    copy; keep_compiled: a run that ends well leaves its cache there when there is none yet (the baseline's: runs of
    edited train.py add nothing to it). Returns returncode (None: killed at the limit), seconds, log, record (its
    text, or None), changed (of the harness), weights (the path, or None when it handed over none),
    probe_seconds (None: no probe run)."""
    cache = Path(cache) if cache else integrity.cache_dir()
    root, lock = run_folders.new_run_folder()
    # train.py works in task/ with its own temp folder tmp/; the scorer in scorer/, with the driver's harness
    work, private_tmp, scoring = root / "task", root / "tmp", root / "scorer"
    log_path = Path(log_path or root / "run.log")
    handed = root / WEIGHTS_FILE  # the scorer's copy of the weights train.py handed over
    try:
        scoring.mkdir()
        for name in integrity.HARNESS:
            (scoring / name).write_text(harness[name])
        if check:
            check(scoring, cache)
        env = env or os.environ
        deny, caveats = guarded(cache, env)  # once: it looks at every validation file's links
        words = sandbox.describe(sandbox.probe(), caveats)
        kept = {k: v for k, v in env.items() if not SECRET.search(k) and k not in ("PWD", "OLDPWD")}
        env = {**kept, "AUTORESEARCH_CACHE": str(cache)}  # train.py is code a model wrote: no key, token, password
        probe_log = log_path.with_name(log_path.stem + ".probe.log")
        warm = bool(compiled) and Path(compiled).is_dir()  # it starts from the tag's compile cache

        def folders(task, tmp, loaded):
            """A run of train.py: its folder and its temp folder, new; the command that runs it in its sandbox
            (writing only there, and where the user's env says; reading neither the run's log nor the probe run's)
            and its variables."""
            nonlocal warm
            for folder in (task, tmp):
                folder.mkdir()
            (task / "prepare.py").write_text(harness["prepare.py"])
            (task / "train.py").write_text(train_source)
            private = {name: str(tmp) for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME")}  # where libraries write
            private.update(TORCHINDUCTOR_CACHE_DIR=str(tmp / "compiled" / "inductor"),
                           TRITON_CACHE_DIR=str(tmp / "compiled" / "triton"))
            try:
                if warm:
                    copy_plain_files(Path(compiled), tmp / "compiled")
            except OSError:  # a full disk: it compiles from nothing
                run_folders.remove_folder(tmp / "compiled")
                warm = False
            if loaded:
                shutil.copyfile(loaded, task / "load.safetensors")
                private[LOAD_WEIGHTS] = str(task / "load.safetensors")
            command = sandbox.wrap([sys.executable, "train.py"],
                                   sandbox.policy(task, tmp, [*deny, log_path, probe_log], env))
            return command, private

        confined, private = folders(work, private_tmp, load)
        private[SAVE_WEIGHTS] = str(work / WEIGHTS_FILE)  # handed to the scorer before the evaluation
        before = integrity.harness_fingerprint(work, cache) | integrity.harness_files(scoring, "scorer/")
        probe_work = root / "probe-task"

        def probe_run():
            """The probe run's folders, new ones beside the first run's (which it cannot read)."""
            return *folders(probe_work, root / "probe-tmp", handed), probe_work, probe_log

        returncode, seconds, record, probe_seconds = run_training(
            log_path, timeout, pid_path, work, scoring, env, key_hex, split, on_start, confined, private,
            probe=Probe(handed, probe_run))
        # what the runs did to the harness (the cache hashed once, after both), the probe run's prepare.py too
        changes = integrity.fingerprint_changes(
            before, integrity.harness_fingerprint(work, cache) | integrity.harness_files(scoring, "scorer/"))
        probed = integrity.harness_files(probe_work)
        changes += [name for name, digest in probed.items() if digest != before.get(name)]
        if keep_compiled and returncode == 0 and not Path(compiled).exists():  # the tag's first: the baseline's
            keep_compile_cache(private_tmp / "compiled", Path(compiled))
        log_text = run_log.read_log(log_path)
        copied = False
        if weights and handed.exists():
            try:
                Path(weights).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(handed, weights)  # a rename where both are on one file system
                copied = True
            except OSError:  # a full disk: the run goes on without its weights
                pass
    finally:
        run_folders.remove_folder(root)
        lock.close()
    return dict(returncode=returncode, seconds=seconds, log=log_text, record=record, changed=sorted(set(changes)),
                sandbox=words, weights=str(weights) if copied else None, compile_cache="warm" if warm else "cold",
                probe_seconds=probe_seconds)


def keep_compile_cache(source, destination):
    """The run's compile cache becomes the tag's, whole or not at all (two baseline runs may end together; a full
    disk leaves no cache, and the night goes on)."""
    partial = destination.with_name(f"{destination.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        copy_plain_files(source, partial)
        partial.rename(destination)
    except OSError:  # another run's is there already, or the disk is full
        shutil.rmtree(partial, ignore_errors=True)


def copy_plain_files(source, destination):
    """The plain files under `source` (copy_plain_file), in the same places under `destination`; nothing when
    `source` itself is a link (to a folder train.py could not read). Raises OSError when one could not be
    written."""
    destination.mkdir(parents=True, exist_ok=True)
    if source.is_symlink() or not source.is_dir():
        return
    for folder, _, names in os.walk(source):  # does not follow links to folders beneath
        for name in names:
            path = Path(folder) / name
            copy_plain_file(path, destination / path.relative_to(source))


def copy_plain_file(source, destination):
    """Copy what train.py's process left at `source` if it is a file of its own: not a link to another file, which it
    could not read itself (its sandbox denies the validation data, not a link to it), nor a pipe, which would never
    end. Whether it did; raises OSError when the copy could not be written."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    partial = destination.with_name(destination.name + ".tmp")
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            return False
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as copy:
                shutil.copyfileobj(file, copy)
            os.replace(partial, destination)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
    return True


def guarded(cache, env):
    """(what train.py must not read: the cache's validation data, the driver's .autoresearch, the folders of the
    runs, your credentials; what its sandbox then cannot protect, in words)"""
    paths, caveats = integrity.validation_files(cache)
    paths += [state.STATE_ROOT.resolve(), run_folders.runs_folder()] + sandbox.credentials(env)
    return paths, sandbox.caveats(env, paths) + caveats


def sandbox_words(cache, env):
    """This machine's sandbox for train.py in words: what it has, then what it lacks."""
    return sandbox.describe(sandbox.probe(), guarded(cache, env)[1])


class Probe(typing.NamedTuple):
    """The probe run run_training makes when the scorer asks for it: where the scorer keeps the weights handed over
    (at most WEIGHTS_LIMIT bytes), and start() -> (command, train_env, folder, log path) of the second, in a
    folder of its own."""
    weights: Path
    start: typing.Callable


def run_training(log_path, timeout, pid_path, cwd, scoring, env, key_hex, split="val", on_start=None, command=None,
                 train_env=None, probe=None):
    """Run train.py in cwd (`command`, by default `python train.py`, with `train_env` added to env) and the scorer
    (scorer.py in `scoring`) beside it, both writing to log_path; kill the run's process tree on timeout or
    interrupt. With `probe`, the scorer may then ask for the probe run (Probe), which gets the same time limit.
    Returns (exit code, or None when killed at the limit; seconds; the scorer's last record line or None; seconds
    of the probe run or None). pid_path (if any) names the run and its folder while it goes, for
    kill_leftover_training."""
    ours, theirs = socket.socketpair()
    probe_ours, probe_theirs = socket.socketpair() if probe else (None, None)
    started, clock = time.time(), time.monotonic()
    records = _Records()
    request = {"key": key_hex, "fd": ours.fileno(), "split": split, "started": clock}
    if probe:
        request.update(probe_fd=probe_ours.fileno(), weights={"path": str(probe.weights), "limit": WEIGHTS_LIMIT})
    with open(log_path, "wb") as log_file:  # one log per run: a run again after a resume starts it anew
        scorer = subprocess.Popen([sys.executable, "scorer.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=log_file, cwd=scoring, env=env, pass_fds=[ours.fileno()] + (
                                      [probe_ours.fileno()] if probe else []), **OWN_GROUP)
        process = None
        try:
            process = _start(command or [sys.executable, "train.py"], cwd, {**env, **(train_env or {})}, theirs,
                             log_file)
            scorer.stdin.write(json.dumps(request).encode() + b"\n")
            scorer.stdin.flush()
        except BaseException:
            for child in (process, scorer):
                if child is not None:
                    run_folders.kill_tree(child.pid)
                    child.wait()
            if probe_theirs is not None:
                probe_theirs.close()
            raise
        finally:
            for end in (ours, theirs, probe_ours):
                if end is not None:
                    end.close()
    threading.Thread(target=records.read, args=(scorer.stdout,), daemon=True).start()
    probe_seconds = None

    def started_in(folder, process):  # for kill_leftover_training, and for whoever may cancel the run
        if pid_path:
            pid_path.write_text(f"{process.pid}\n{folder}\n{scorer.pid}")
        if on_start:
            on_start(process)

    try:
        returncode = _supervise(process, timeout, lambda: started_in(cwd, process))
        seconds = time.time() - started
        _tell(scorer, b"ended\n")  # what train.py started may still hold its end of the socket
        if probe and returncode == 0 and records.wait_for_stage(SCORER_GRACE) == "probe":
            probe_command, probe_env, probe_cwd, probe_log = probe.start()
            probe_started = time.time()
            with open(probe_log, "wb") as probe_file:
                second = _start(probe_command, probe_cwd, {**env, **probe_env}, probe_theirs, probe_file)
            probe_theirs.close()  # its end is the probe run's alone: the scorer sees when it has gone
            _supervise(second, timeout, lambda: started_in(probe_cwd, second))
            probe_seconds = time.time() - probe_started
    finally:
        if probe_theirs is not None:
            probe_theirs.close()
        try:
            scorer.stdin.close()  # the run is over: the scorer writes its record and ends
        except OSError:  # it has ended
            pass
        try:
            scorer.wait(SCORER_GRACE)
        except subprocess.TimeoutExpired:
            run_folders.kill_tree(scorer.pid)
            scorer.wait()
        records.done.wait(SCORER_GRACE)
        if pid_path:
            pid_path.unlink(missing_ok=True)
    return returncode, seconds, records.last, probe_seconds


OWN_GROUP = {"start_new_session": True} if os.name == "posix" else {
    "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def _start(command, cwd, env, scorer_end, log_file):
    """train.py's process, in its own process group, holding its end of the socket to the scorer."""
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                            pass_fds=[scorer_end.fileno()], env={**env, SCORER_FD: str(scorer_end.fileno())},
                            **OWN_GROUP)


def _supervise(process, timeout, started):
    """Call started(), then wait for the process; kill its tree at the time limit (then None), on an interrupt or
    an error, and what it left running in its group when it ends. Its exit code."""
    timed_out = threading.Event()
    # A timer, not wait(timeout): that polls, and returns up to 50 ms after the run ends
    timer = threading.Timer(timeout, lambda: (timed_out.set(), run_folders.kill_tree(process.pid)))
    timer.start()
    try:
        started()
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted: Ctrl-C, SIGTERM
            run_folders.kill_tree(process.pid)
            process.wait()
        run_folders.kill_tree(process.pid)  # what it left running in its group
    return None if timed_out.is_set() else returncode


def _tell(scorer, line):
    try:
        scorer.stdin.write(line)
        scorer.stdin.flush()
    except OSError:  # it has ended
        pass


class _Records:
    """The scorer's record lines as they come: the last one (each is whole), and its stage."""

    def __init__(self):
        self.last, self.stage = None, None
        self.changed, self.done = threading.Condition(), threading.Event()

    def read(self, stream):
        for line in stream:
            if not line.strip():
                continue
            try:
                stage = json.loads(line)["record"].get("stage")
            except (ValueError, KeyError, TypeError, AttributeError):
                stage = None
            with self.changed:
                self.last, self.stage = line.decode(errors="replace"), stage
                self.changed.notify_all()
        with self.changed:
            self.done.set()
            self.changed.notify_all()

    def wait_for_stage(self, timeout):
        """Once train.py's run has ended: "probe" when the scorer waits for the probe run, else its stage."""
        with self.changed:
            self.changed.wait_for(lambda: self.stage in ("probe", "final") or self.done.is_set(), timeout)
            return self.stage
