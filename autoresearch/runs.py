"""
The runs of train.py and what each proves: here, one after another (runner.run_training in the
repository), or on Ray workers (ray_executor, with --workers N > 1: WorkerRuns, driven by scheduler.py).

Before a run: prepare.py and the cache are as the tag started, train.py passes the static checks,
the commit changes only train.py. After it: the harness's signed record (integrity.record_problems),
the wall clock against the baseline's, what the run changed or left behind. Each run becomes one
"run" event of the ledger; a run on a worker also records the worker (host, IP, GPU, pid).
"""

import math
import threading
from dataclasses import dataclass
from pathlib import Path

from autoresearch import integrity, runner, state
from autoresearch.console import fail, log


def run_commit(night, experiment, attempt, commit, number, repeats, reference=False):
    """Run the commit here once per repeat number (1 is its first run), one after another; returns the runs.
    reference: runs of the best beside those of the experiment's commit `number` (the paired rule), whose repeat
    is the pair's number."""
    return [run_here(night, experiment, attempt, commit, number, repeat, reference) for repeat in repeats]


def log_path_of(night, number, repeat, reference=False, split="val", commit=""):
    """logs/<n>.log, <n>-<k>.log for its k-th run, <n>-best-<k>.log for the best's run beside it in pair k, and
    holdout-<commit>.log for a commit's run scored on the holdout."""
    if split != "val":
        return night.state_dir / "logs" / f"{split}-{commit[:7]}.log"
    if reference:
        return night.state_dir / "logs" / f"{number}-best-{repeat}.log"
    return night.state_dir / "logs" / (f"{number}.log" if repeat == 1 else f"{number}-{repeat}.log")


def problems_before(night, commit):
    """Why the commit must not run (the static checks, the allowlist); stops the night if the harness changed."""
    changed = integrity.fingerprint_changes(night.fingerprint, integrity.harness_fingerprint())
    if changed:
        fail(f"prepare.py or the prepared cache changed since tag {night.args.tag} started ({', '.join(changed)}): "
             "its results are no longer comparable. Restore them, or start a new --tag.")
    problems = integrity.static_problems(state.file_at(night.repo, commit, "train.py"))
    best = night.ledger.best()
    if best:
        problems += [f"the change touches {name}: only train.py may change"
                     for name in state.changed_files(night.repo, best["commit"], commit) if name != "train.py"]
    return problems


def not_run(night, experiment, attempt, commit, number, repeat, problems, reference=False):
    run = dict(experiment=experiment, attempt=attempt, repeat=repeat, commit=commit, **beside(reference),
               log=str(log_path_of(night, number, repeat, reference)), seconds=0.0, returncode=None, timed_out=False,
               ok=False, val_bpb=None, metrics={}, problems=problems, log_tail="", attestation=None)
    log(f"#{experiment} not run, invalid: {'; '.join(problems)}")
    night.record(event="run", **run)
    return run


def assess(night, run, returncode, seconds, log_text, record, missing, problems, split="val"):
    """Fill the run in from what it did, and ledger it ("holdout_run" for a holdout run: no keep decision may see
    it). Its val_bpb is the one the harness attests (prepare.attested_run), never train.py's printout."""
    metrics = runner.parse_summary(log_text)
    problems = problems + integrity.record_problems(record, missing, returncode, metrics.get("val_bpb"),
                                                    night.constants)
    scored = (integrity.evaluation(record) or {}).get("split", "val")
    if integrity.evaluation(record) and scored != split:
        problems.append(f"the harness scored the {scored} split, not the {split} split the driver asked for")
    if returncode is not None and run["experiment"] > 0:  # the baseline's own runs set the limits
        baseline = [r for r in night.ledger.valid_runs() if r["experiment"] == 0]
        problems += integrity.wall_clock_problems(seconds, record, integrity.baseline_timings(baseline),
                                                  night.constants["time_budget"])
    evaluated = integrity.evaluation(record)
    val_bpb = evaluated["val_bpb"] if evaluated else None
    ok = returncode == 0 and "val_bpb" in metrics and val_bpb is not None and math.isfinite(val_bpb) and not problems
    run.update(seconds=round(seconds, 1), returncode=returncode, timed_out=returncode is None, ok=ok,
               val_bpb=val_bpb, metrics=metrics, problems=problems, log_tail="" if ok else runner.log_tail(log_text),
               attestation=record)
    night.record(event="run" if split == "val" else "holdout_run", **run)
    return run


# -----------------------------------------------------------------------------
# Here, in the repository

def beside(reference):
    """What marks a run of the best made beside a candidate's, in its ledger record."""
    return {"reference": True} if reference else {}


def run_here(night, experiment, attempt, commit, number, repeat, reference=False, split="val"):
    """One run of the commit (checked out in the work tree) here. split "holdout": evaluate_bpb scores the
    holdout instead, logged as logs/holdout-<commit>.log and ledgered apart from the runs decisions read."""
    log_path = log_path_of(night, number, repeat, reference, split, commit)
    if problems := problems_before(night, commit):
        return not_run(night, experiment, attempt, commit, number, repeat, problems, reference)
    what = f"the best {commit[:7]} beside it (pair {repeat})" if reference else \
        f"{commit[:7]}{f' again ({repeat})' if repeat > 1 else ''}"
    log(f"#{experiment} running {what} (log {log_path}, time limit {night.timeout:.0f}s)")
    night.record(event="run_started", experiment=experiment, attempt=attempt, commit=commit, **beside(reference),
                 log=str(log_path))
    untracked_before = set(state.untracked_files(night.repo))
    attestation, stop_progress = integrity.Attestation(split=split), threading.Event()
    progress = threading.Thread(target=runner.show_progress, args=(log_path, f"#{experiment}", stop_progress),
                                daemon=True)
    progress.start()
    try:
        returncode, seconds = runner.run_training(log_path, night.timeout, night.state_dir / "train.pid",
                                                  attestation.request())
        record, missing = attestation.read()
    finally:
        stop_progress.set()
        progress.join()
        attestation.close()
    left = sorted(name for name in set(state.untracked_files(night.repo)) - untracked_before
                  if "__pycache__" not in Path(name).parts)
    for name in left:  # a checkpoint the next run could start from: every run starts from nothing
        Path(name).unlink(missing_ok=True)
    changed = integrity.fingerprint_changes(night.fingerprint, integrity.harness_fingerprint())
    problems = [f"the run changed {', '.join(changed)}"] if changed else []
    problems += [f"the run changed {name}" for name in state.dirty_tracked_files(night.repo) if name != "prepare.py"]
    problems += [f"the run left {', '.join(left)} in the repository (removed): a run starts from nothing"] if left else []
    run = dict(experiment=experiment, attempt=attempt, repeat=repeat, commit=commit, **beside(reference),
               log=str(log_path))
    log_text = log_path.read_bytes().decode(errors="replace")  # keeps the \r of progress lines
    return assess(night, run, returncode, seconds, log_text, record, missing, problems, split)


# -----------------------------------------------------------------------------
# On Ray workers

@dataclass
class Sent:
    """A run out on a worker: what it is, the channel its record comes back through, and how often it went out."""
    experiment: int
    attempt: int
    commit: str
    number: int
    repeat: int
    reference: bool = False  # a run of the best beside a candidate's (the paired rule)
    split: str = "val"  # what evaluate_bpb scores: the holdout for holdout.py's runs
    attestation: integrity.Attestation = None
    tries: int = 1


class WorkerRuns:
    """The runs out on Ray workers. send() puts one out (or refuses it, when it must not run), collect() returns
    those that ended, in the order they did; a run whose worker or node died goes out again, once, and the
    ledger says so. cancel() stops them all (Ctrl-C, SIGTERM, an error: no run may outlive the night)."""

    def __init__(self, night):
        from autoresearch import ray_executor
        self.night, self.ray_executor = night, ray_executor
        self.pending = {}  # Ray ref: Sent
        self.refused = []  # runs that never went out (static checks, the allowlist): they end at once
        self.checked = {}  # commit: problems_before's answer (the repeats of a commit need no second look)

    def busy(self):
        return len(self.pending)

    def send(self, experiment, attempt, commit, number, repeat, reference=False, split="val", tries=1):
        night = self.night
        if commit not in self.checked:
            self.checked[commit] = problems_before(night, commit)
        if problems := self.checked[commit]:
            self.refused.append(not_run(night, experiment, attempt, commit, number, repeat, problems, reference))
            return
        sent = Sent(experiment, attempt, commit, number, repeat, reference, split, integrity.Attestation(split=split),
                    tries)
        ref = self.ray_executor.submit(night.cluster, state.file_at(night.repo, commit, "train.py"),
                                       Path("prepare.py").read_text(), night.portable_fingerprint,
                                       sent.attestation.key.hex(), night.timeout, split=split)
        self.pending[ref] = sent
        night.record(event="run_started", experiment=experiment, attempt=attempt, commit=commit, **beside(reference),
                     log=str(log_path_of(night, number, repeat, reference, split, commit)), repeat=repeat, tries=tries)

    def collect(self, timeout):
        """The runs that ended within timeout seconds (and those refused since the last call)."""
        ended, self.refused = self.refused, []
        if not self.pending:
            return ended
        done, _ = self.ray_executor.wait(list(self.pending), timeout=timeout)
        for ref in done:
            sent = self.pending.pop(ref)
            try:
                result = self.ray_executor.result(ref)
            except self.ray_executor.NodeMismatch as error:
                fail(str(error))
            except Exception as error:
                if not self.ray_executor.is_infrastructure_failure(error) or sent.tries > 1:
                    raise
                log(f"#{sent.experiment} run {sent.repeat}: its worker died ({type(error).__name__}); running it again")
                self.night.record(event="requeued", experiment=sent.experiment, commit=sent.commit, repeat=sent.repeat,
                                  error=f"{type(error).__name__}: {str(error)[:300]}")
                self.send(sent.experiment, sent.attempt, sent.commit, sent.number, sent.repeat, sent.reference,
                          sent.split, sent.tries + 1)
                continue
            finally:
                sent.attestation.close()
            ended.append(finished_on_worker(self.night, sent, result))
        return ended

    def cancel(self):
        self.ray_executor.cancel_all(list(self.pending))
        self.pending.clear()


def finished_on_worker(night, sent, result):
    log_path = log_path_of(night, sent.number, sent.repeat, sent.reference, sent.split, sent.commit)
    log_path.write_text(result["log"])
    record, missing = sent.attestation.verify(result["record"])
    problems = [f"the run changed {', '.join(result['changed'])}"] if result["changed"] else []
    worker = {key: result[key] for key in ("hostname", "ip", "gpu", "worker_pid")}
    run = dict(experiment=sent.experiment, attempt=sent.attempt, repeat=sent.repeat, commit=sent.commit,
               **beside(sent.reference), log=str(log_path), worker=worker)
    run = assess(night, run, result["returncode"], result["seconds"], result["log"], record, missing, problems,
                 sent.split)
    outcome = f"val_bpb {run['val_bpb']:.6f}" if run["ok"] else "no valid val_bpb"
    log(f"#{sent.experiment} run {sent.repeat} on {worker['hostname']} ({worker['gpu']}): {outcome} "
        f"({run['seconds']:.0f}s)")
    return run
