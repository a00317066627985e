"""
The runs of train.py and what each proves, on an executor: LocalExecutor (this machine) or
ray_executor.RayExecutor (a cluster), each running train.py in a fresh folder (runner.run_in_folder). An executor
has `slots`, `remote`, free_slots(), submit(key, request), wait(timeout) -> [(key, the run's dict or the error it
raised)], cancel(key), cancel_all(), describe(), waiting_for() and close().

Before a run: the harness is as the tag started, train.py passes the static checks, only train.py changed. After:
the harness's signed record, the wall clock against the baseline's, what it changed of the harness. Each run is
one "run" event of the ledger ("holdout_run" for the holdout's), with its worker.
"""

import functools
import math
import os
import queue
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from autoresearch import integrity, run_folders, run_log, runner, state, weights
from autoresearch.console import fail, log
from autoresearch.night import time_limit


COMPILE_CACHE = "compile-cache"  # in the tag's folder: what torch.compile made in the baseline's first run


@dataclass(frozen=True)
class RunKey:
    """One run: of the experiment's commit (role "candidate") or of the best beside it (role "best", beside the
    candidate's commit), for pair `pair`; number: the candidate's ref, which names the logs."""
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
    harness: dict  # {name: source} of integrity.HARNESS
    key_hex: str
    timeout: float
    split: str
    log_path: Path
    weights: Path | None = None  # where the weights of the model it scored go (weights.py)
    compiled: Path | None = None  # the tag's compile cache (runner.run_in_folder), on this machine
    keep_compiled: bool = False  # the baseline's run: its compile cache becomes the tag's


def role_fields(key):
    """What marks a run of the best made beside a candidate's in its ledger records."""
    return {"reference": True, "beside": key.beside} if key.role == "best" else {}


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
    """[(CUDA device id, model)] of the GPUs this machine shows, as CUDA_VISIBLE_DEVICES names them, without torch."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    gpus = [[field.strip() for field in line.split(",", 2)] for line in listed.splitlines() if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(index, name) for index, _, name in gpus]
    names = {key: name for index, uuid, name in gpus for key in (index, uuid)}
    return [(device, next((name for key, name in names.items() if device and key.startswith(device)), "unknown"))
            for device in (d.strip() for d in visible.split(",")) if device]


class LocalExecutor:
    """Runs on this machine, each watched by a thread: one slot per GPU given (its CUDA_VISIBLE_DEVICES set to that
    GPU), or `slots` runs at once on the CPU. A run's log is written where the night keeps it, as it goes; its slot
    is free again the moment it ends, and a cancelled run is killed and never reported."""
    remote = False

    def __init__(self, slots, state_dir, gpus=()):
        self.slots, self.state_dir, self.gpus = slots, Path(state_dir), list(gpus)[:slots]
        self.free, self.threads, self.processes, self.cancelled = list(range(self.slots)), {}, {}, set()
        self.lock, self.ended = threading.Lock(), queue.Queue()

    @functools.cached_property
    def device_type(self):
        """"cuda" or not, as train.py decides (torch.cuda.is_available() in this same environment), which is what
        its small-compute block tests: also for an NVIDIA GPU that nvidia-smi does not show."""
        if self.gpus:
            return "cuda"
        import torch  # here: a night that never asks for an edit never pays for it

        return "cuda" if torch.cuda.is_available() else "cpu"

    def describe(self):
        gpus = f", one GPU each ({', '.join(name for _, name in self.gpus)})" if self.gpus else ""
        return f"{self.slots} at once on this machine{gpus}" if self.slots > 1 else "one at a time on this machine"

    def free_slots(self):
        return len(self.free)

    def submit(self, key, request):
        with self.lock:
            slot = self.free.pop(0)
        device, gpu = self.gpus[slot] if self.gpus else (None, "cpu")
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
        worker = dict(hostname=socket.gethostname(), ip="127.0.0.1", gpu=gpu, worker_pid=os.getpid())

        def watch():
            try:
                result = runner.run_in_folder(request.train_source, request.harness, request.key_hex,
                                              request.timeout, self.state_dir / f"train-{slot}.pid", request.split,
                                              request.log_path, env=env, weights=request.weights,
                                              compiled=request.compiled, keep_compiled=request.keep_compiled,
                                              on_start=lambda process: self.started(key, process))
                outcome = dict(result, worker=worker)
            except BaseException as error:  # handed to the driver's thread
                outcome = error
            with self.lock:
                self.processes.pop(key, None)
                del self.threads[key]
                self.free.append(slot)
                if key in self.cancelled:
                    self.cancelled.discard(key)
                    return
            self.ended.put((key, outcome))
        self.threads[key] = threading.Thread(target=watch, daemon=True)
        self.threads[key].start()

    def started(self, key, process):
        """A run's process has started: it is killed at once when its run was cancelled meanwhile."""
        with self.lock:
            self.processes[key] = process
            if key in self.cancelled:
                run_folders.kill_tree(process.pid)

    def wait(self, timeout):
        try:
            ended = [self.ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.ended.empty():
            ended.append(self.ended.get_nowait())
        return ended

    def cancel(self, key):
        with self.lock:
            if key in self.threads:
                self.cancelled.add(key)
                if (process := self.processes.get(key)) and process.poll() is None:  # never a pid reused since
                    run_folders.kill_tree(process.pid)

    def cancel_all(self):
        threads = list(self.threads.values())
        for key in list(self.threads):
            self.cancel(key)
        for thread in threads:
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
        fail(f"the harness (prepare.py, scorer.py) or the prepared cache changed since tag {night.args.tag} started "
             f"({', '.join(changed)}): its results are no longer comparable. Restore them, or start a new --tag.")
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
               **role_fields(key), log=str(log_path_of(night, key)))
    problems = list(problems)
    if result is None:  # refused before it ran
        run.update(seconds=0.0, returncode=None, timed_out=False, ok=False, val_bpb=None, metrics={},
                   problems=problems, log_tail="", attestation=None)
        return night.record(event="run" if key.split == "val" else "holdout_run", **run)
    record, missing = integrity.verify_record(bytes.fromhex(result["key_hex"]), result["record"])
    metrics, returncode, seconds = run_log.parse_summary(result["log"]), result["returncode"], result["seconds"]
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
    weights_path = Path(result["weights"]) if result.get("weights") else None
    described = weights.describe(weights_path, night.state_dir) if weights_path and ok else None
    if weights_path and not described:  # a model the scorer did not score, or not a safetensors file
        weights_path.unlink(missing_ok=True)
    probe_seconds = result.get("probe_seconds")  # the probe run's, after the run's own
    run.update(seconds=round(seconds, 1), probe_seconds=None if probe_seconds is None else round(probe_seconds, 1),
               returncode=returncode, timed_out=returncode is None, ok=ok,
               val_bpb=val_bpb, metrics=metrics, problems=problems,
               log_tail="" if ok else run_log.log_tail(result["log"]), attestation=record, worker=result["worker"],
               sandbox=result.get("sandbox"), limit=result.get("limit"), compile_cache=result.get("compile_cache"),
               **({"weights": described} if described else {}))
    return night.record(event="run" if key.split == "val" else "holdout_run", **run)


# -----------------------------------------------------------------------------
# The night's runs on its executor

class Runs:
    """send() puts a run out (or refuses it at once); collect() returns the runs that ended, assessed and ledgered;
    a run whose worker or node died goes out again, once. cancel_all(): no run may outlive the night."""

    def __init__(self, night, executor):
        self.night, self.executor = night, executor
        self.out = {}  # key: (request, tries)
        self.refused = []  # runs that never went out: they end at once
        self.checked = {}  # commit: (problems_before's answer, its train.py, prepare.py): looked at once a commit

    def send(self, key, tries=1):
        night = self.night
        if key.commit not in self.checked:
            self.checked[key.commit] = (problems_before(night, key.commit),
                                        state.file_at(night.repo, key.commit, "train.py"),
                                        {name: state.file_at(night.repo, key.commit, name)
                                         for name in integrity.HARNESS})
        problems, train_source, harness = self.checked[key.commit]
        if problems:
            log(f"#{key.experiment} not run, invalid: {'; '.join(problems)}")
            self.refused.append(assess(night, key, None, problems))
            return
        log_path = log_path_of(night, key)
        compiled = None if self.executor.remote else night.state_dir / COMPILE_CACHE  # a node keeps nothing
        request = Request(train_source, harness, secrets.token_hex(32), time_limit(night)[0], key.split, log_path,
                          weights.run_file(night.state_dir, log_path) if key.split == "val" else None,
                          compiled, compiled is not None and key.experiment == 0 and key.split == "val")
        self.executor.submit(key, request)
        self.out[key] = (request, tries)
        night.record(event="run_started", experiment=key.experiment, attempt=key.attempt, commit=key.commit,
                     repeat=key.pair, **role_fields(key), log=str(request.log_path), tries=tries)

    def collect(self, timeout):
        """The runs that ended within timeout seconds (and those refused since the last call)."""
        ended, self.refused = self.refused, []
        for key, outcome in self.executor.wait(timeout) if self.out else []:
            if key not in self.out:  # cancelled while it ended
                continue
            request, tries = self.out.pop(key)
            if isinstance(outcome, BaseException):
                if not getattr(self.executor, "is_infrastructure_failure", lambda error: False)(outcome) or tries > 1:
                    raise outcome
                log(f"#{key.experiment} run {key.pair}: its worker died ({type(outcome).__name__}); running it again")
                self.night.record(event="requeued", experiment=key.experiment, commit=key.commit, repeat=key.pair,
                                  **role_fields(key), error=f"{type(outcome).__name__}: {str(outcome)[:300]}")
                self.send(key, tries + 1)
                continue
            ended.append(assess(self.night, key, dict(outcome, key_hex=request.key_hex, limit=request.timeout)))
        return ended

    def cancel_all(self):
        self.executor.cancel_all()
        self.out.clear()
