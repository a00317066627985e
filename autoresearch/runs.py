"""
The runs of train.py and what each proves, on an executor: LocalExecutor (this machine) or
ray_executor.RayExecutor (a cluster), each running train.py in a fresh folder (runner.run_in_folder). An executor
has `slots`, `remote`, submit(key, request), wait(timeout) -> [(key, the run's dict or the error it raised)],
cancel(key), cancel_all(), describe(), waiting_for() and close().

Before a run: the harness is as the tag started, train.py passes the static checks, only train.py changed. After:
the harness's signed record, the wall clock against the baseline's, what it changed of the harness. Each run is
one "run" event of the ledger ("holdout_run" for the holdout's), with its worker.
"""

import math
import os
import queue
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from autoresearch import integrity, runner, state
from autoresearch.console import fail, log


@dataclass(frozen=True)
class RunKey:
    """One run: of the experiment's commit (role "candidate"), or of the best beside it (role "best": commit is
    the best's, beside the candidate's), for pair `pair`; number: the candidate commit's ref, which names the logs;
    split "holdout": scored on the holdout."""
    experiment: int
    commit: str
    number: int
    pair: int = 1
    role: str = "candidate"
    beside: str = ""
    attempt: int = 0
    split: str = "val"


@dataclass(frozen=True)
class Request:
    """What an executor needs for a run: the sources, its attestation key, where its log goes."""
    train_source: str
    prepare_source: str
    key_hex: str
    timeout: float
    split: str
    log_path: Path


def log_path_of(night, key):
    """logs/<n>.log, <n>-<k>.log for pair k, <n>-best-<k>.log for the best's run beside it in pair k, and
    holdout-<commit>.log for a commit's run scored on the holdout."""
    if key.split != "val":
        return night.state_dir / "logs" / f"{key.split}-{key.commit[:7]}.log"
    if key.role == "best":
        return night.state_dir / "logs" / f"{key.number}-best-{key.pair}.log"
    return night.state_dir / "logs" / (f"{key.number}.log" if key.pair == 1 else f"{key.number}-{key.pair}.log")


# -----------------------------------------------------------------------------
# This machine

def local_gpus():
    """[(CUDA device id, name)] of the GPUs this machine shows (CUDA_VISIBLE_DEVICES respected), without torch."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    names = [line.split(":", 1)[1].split("(UUID")[0].strip() for line in listed.splitlines() if line.startswith("GPU ")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else map(str, range(len(names)))
    return [(d, names[int(d)] if d.isdigit() and int(d) < len(names) else f"GPU {d}") for d in ids]


class LocalExecutor:
    """Runs on this machine, each watched by a thread: one slot per GPU given (its CUDA_VISIBLE_DEVICES set to that
    GPU), or `slots` runs at once on the CPU. A run's log is written where the night keeps it, as it goes."""
    remote = False

    def __init__(self, slots, state_dir, gpus=()):
        self.slots, self.state_dir, self.gpus = slots, Path(state_dir), list(gpus)[:slots]
        self.free = list(range(self.slots))
        self.running = {}  # key: (slot, thread)
        self.processes, self.cancelled, self.lock = {}, set(), threading.Lock()
        self.ended = queue.Queue()

    def describe(self):
        gpus = f", one GPU each ({', '.join(name for _, name in self.gpus)})" if self.gpus else ""
        return f"{self.slots} at once on this machine{gpus}" if self.slots > 1 else "one at a time on this machine"

    def submit(self, key, request):
        slot = self.free.pop(0)
        device, gpu = self.gpus[slot] if self.gpus else (None, "cpu")
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
        worker = dict(hostname=socket.gethostname(), ip="127.0.0.1", gpu=gpu, worker_pid=os.getpid())

        def watch():
            try:
                result = runner.run_in_folder(request.train_source, request.prepare_source, request.key_hex,
                                              request.timeout, self.state_dir / f"train-{slot}.pid", request.split,
                                              request.log_path, env=env,
                                              on_start=lambda process: self.started(key, process))
                outcome = dict(result, worker=worker)
            except BaseException as error:  # handed to the driver's thread
                outcome = error
            with self.lock:
                self.processes.pop(key, None)
            self.ended.put((key, outcome))
        thread = threading.Thread(target=watch, daemon=True)
        self.running[key] = (slot, thread)
        thread.start()

    def started(self, key, process):
        """A run's process has started: it is killed at once when its run was cancelled meanwhile."""
        with self.lock:
            self.processes[key] = process.pid
            if key in self.cancelled:
                runner.kill_tree(process.pid)

    def wait(self, timeout):
        try:
            ended = [self.ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.ended.empty():
            ended.append(self.ended.get_nowait())
        for key, _ in ended:
            self.free.append(self.running.pop(key)[0])
        return [(key, outcome) for key, outcome in ended if key not in self.cancelled]

    def cancel(self, key):
        with self.lock:
            if key in self.running:
                self.cancelled.add(key)
                if key in self.processes:
                    runner.kill_tree(self.processes[key])

    def cancel_all(self):
        for key in list(self.running):
            self.cancel(key)
        for _, thread in list(self.running.values()):
            thread.join(timeout=30)

    def waiting_for(self):
        return ""

    def close(self):
        pass


# -----------------------------------------------------------------------------
# Checks, before and after

def problems_before(night, commit):
    """Why the commit must not run (the static checks, the allowlist); stops the night if the harness changed."""
    if changed := integrity.fingerprint_changes(night.fingerprint, integrity.harness_fingerprint()):
        fail(f"prepare.py or the prepared cache changed since tag {night.args.tag} started ({', '.join(changed)}): "
             "its results are no longer comparable. Restore them, or start a new --tag.")
    problems = integrity.static_problems(state.file_at(night.repo, commit, "train.py"))
    best = night.ledger.best()
    if best:
        problems += [f"the change touches {name}: only train.py may change"
                     for name in state.changed_files(night.repo, best["commit"], commit) if name != "train.py"]
    return problems


def assess(night, key, result, problems=()):
    """The run's ledger record, from what it did (result: runner.run_in_folder's dict, None when it never ran).
    Its val_bpb is the one the harness attests, never train.py's printout."""
    run = dict(experiment=key.experiment, attempt=key.attempt, repeat=key.pair, commit=key.commit,
               **({"reference": True, "beside": key.beside} if key.role == "best" else {}),
               log=str(log_path_of(night, key)))
    problems = list(problems)
    if result is None:  # refused before it ran
        run.update(seconds=0.0, returncode=None, timed_out=False, ok=False, val_bpb=None, metrics={},
                   problems=problems, log_tail="", attestation=None)
        return night.record(event="run" if key.split == "val" else "holdout_run", **run)
    record, missing = integrity.verify_record(bytes.fromhex(result["key_hex"]), result["record"])
    metrics, returncode, seconds = runner.parse_summary(result["log"]), result["returncode"], result["seconds"]
    problems += [f"the run changed {', '.join(result['changed'])}"] if result["changed"] else []
    problems += integrity.record_problems(record, missing, returncode, metrics.get("val_bpb"), night.constants)
    evaluated = integrity.evaluation(record)
    if evaluated and evaluated.get("split", "val") != key.split:
        problems.append(f"the harness scored the {evaluated.get('split', 'val')} split, not the {key.split} split "
                        "the driver asked for")
    if returncode is not None and key.experiment > 0:  # the baseline's own runs set the limits
        baseline = [r for r in night.ledger.valid_runs() if r["experiment"] == 0]
        problems += integrity.wall_clock_problems(seconds, record, integrity.baseline_timings(baseline),
                                                  night.constants["time_budget"])
    val_bpb = evaluated["val_bpb"] if evaluated else None
    ok = returncode == 0 and "val_bpb" in metrics and val_bpb is not None and math.isfinite(val_bpb) and not problems
    run.update(seconds=round(seconds, 1), returncode=returncode, timed_out=returncode is None, ok=ok,
               val_bpb=val_bpb, metrics=metrics, problems=problems,
               log_tail="" if ok else runner.log_tail(result["log"]), attestation=record, worker=result["worker"])
    return night.record(event="run" if key.split == "val" else "holdout_run", **run)


# -----------------------------------------------------------------------------
# The night's runs on its executor

class Runs:
    """send() puts a run out (or refuses it at once, when it must not run); collect() returns the runs that ended,
    assessed and ledgered, in the order they did. A run whose worker or node died goes out again, once, and the
    ledger says so. cancel_all() stops them all: no run may outlive the night."""

    def __init__(self, night, executor):
        self.night, self.executor = night, executor
        self.out = {}  # key: (request, tries)
        self.refused = []  # runs that never went out: they end at once
        self.checked = {}  # commit: problems_before's answer (the repeats of a commit need no second look)

    def send(self, key, tries=1):
        night = self.night
        if key.commit not in self.checked:
            self.checked[key.commit] = problems_before(night, key.commit)
        if problems := self.checked[key.commit]:
            log(f"#{key.experiment} not run, invalid: {'; '.join(problems)}")
            self.refused.append(assess(night, key, None, problems))
            return
        request = Request(state.file_at(night.repo, key.commit, "train.py"),
                          state.file_at(night.repo, key.commit, "prepare.py"), integrity.new_key().hex(),
                          night.timeout, key.split, log_path_of(night, key))
        self.executor.submit(key, request)
        self.out[key] = (request, tries)
        night.record(event="run_started", experiment=key.experiment, attempt=key.attempt, commit=key.commit,
                     repeat=key.pair, **({"reference": True, "beside": key.beside} if key.role == "best" else {}),
                     log=str(request.log_path), tries=tries)

    def collect(self, timeout):
        """The runs that ended within timeout seconds (and those refused since the last call)."""
        ended, self.refused = self.refused, []
        for key, outcome in self.executor.wait(timeout) if self.out else []:
            request, tries = self.out.pop(key)
            if isinstance(outcome, BaseException):
                if not getattr(self.executor, "is_infrastructure_failure", lambda error: False)(outcome) or tries > 1:
                    raise outcome
                log(f"#{key.experiment} run {key.pair}: its worker died ({type(outcome).__name__}); running it again")
                self.night.record(event="requeued", experiment=key.experiment, commit=key.commit, repeat=key.pair,
                                  error=f"{type(outcome).__name__}: {str(outcome)[:300]}")
                self.send(key, tries + 1)
                continue
            ended.append(assess(self.night, key, dict(outcome, key_hex=request.key_hex)))
        return ended

    def cancel_all(self):
        self.executor.cancel_all()
        self.out.clear()
