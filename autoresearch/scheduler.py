"""
The night on several workers (--workers N > 1, or --ray): every worker kept busy, decisions made in the order
experiments end. agent_loop.run_night calls:

    scheduler.connect_workers(night)                             # Ray: a private local instance, or --ray's
    reason = scheduler.run_night_on_workers(night, make_agent)   # make_agent(repo) -> a new agent

What goes out when a worker is free: the baseline's noise runs (all at once), then the runs a promising
candidate still needs before the keep rule can decide (together; paired, each of its runs beside a run of its
base, at the same time), then the first run of a new idea. The agent is
asked for ideas ahead, while runs go on, so that one is ready when a worker frees up: as many more than the
free workers as free up during one agent call (measured on the night so far). Each idea's prompt lists the
experiments being tested now. An agent that edits files itself (claude-code) works in a scratch worktree of its
own per proposal; candidates are committed beside the branch, and the work tree stays at the best commit.

A candidate is judged against the best it was proposed on. When that is still the best, the keep rule decides
as in a serial night. When the best has moved on and the candidate beat its base, its change is merged onto the
new best (a three-way merge of train.py) and runs again as a new experiment, "<description> on top of
<commit>"; a change that does not merge is discarded, saying why. So the branch head is always the best kept
commit, and every kept row is better than the best before it, as in a serial night.
"""

import concurrent.futures
import heapq
import itertools
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import psutil

from autoresearch import integrity, keep_rule, runner, state
from autoresearch.agents import MAX_DESCRIPTION, Change, ask_for_change
from autoresearch.console import fail, log
from autoresearch.night import (already_run, before_proposal, check_baseline_run, finish_baseline, is_paired,
                                record_proposal, record_result, why_stop)
from autoresearch.prompts import fix_prompt, idea_prompt
from autoresearch.runs import WorkerRuns

POLL_SECONDS = 0.2  # how long the driver waits for a run or an agent call to end before it looks again
CONFIRM, FIRST = 0, 1  # priorities: the runs a candidate needs to be decided go out before a new idea's first
ON_TOP = re.compile(r" on top of [0-9a-f]{7}$")


@dataclass
class Experiment:
    """One experiment in flight: being proposed, running, or waiting for a fix."""
    number: int
    base: str | None  # the best commit it was proposed on, whose runs it is compared with (None: the baseline)
    description: str = ""
    commit: str | None = None
    ref_number: int | None = None
    attempt: int = 0  # 0: the idea; k: its k-th fix after a crash
    out: int = 0  # its runs queued or on a worker
    ended: list = field(default_factory=list)  # the runs of its current commit that ended


def connect_workers(night):
    """--workers N > 1 or --ray: the Ray cluster the runs go to (run_night's cleanup leaves it)."""
    from autoresearch import ray_executor  # here: Ray is imported only by a night on workers
    args = night.args
    try:
        night.cluster = ray_executor.connect(args.ray, night.state_dir, args.workers)
    except RuntimeError as error:  # a cluster that refuses us, or a local instance not on 127.0.0.1
        fail(str(error))
    if night.cluster.slots < 1:
        fail(f"the Ray cluster at {night.cluster.address} has no {'GPU' if night.cluster.gpus else 'CPU'} for a run: "
             "start its worker nodes (or give the head node resources), then run the same command again.")
    if len(night.cluster.gpu_models) > 1 and not args.allow_mixed_gpus:
        fail(f"the Ray cluster mixes GPU models ({', '.join(night.cluster.gpu_models)}): their speed and run-to-run "
             "noise differ, so runs on one would be compared with runs on another. Use one model, or pass "
             "--allow-mixed-gpus.")
    night.portable_fingerprint = integrity.portable_fingerprint()
    log(f"Ray at {night.cluster.address}: {night.cluster.slots} runs at once, one "
        f"{'GPU' if night.cluster.gpus else 'CPU slot'} each")


def run_night_on_workers(night, make_agent):
    """Experiment until a limit (then finish what is in flight) or an interrupt; the reason it stopped."""
    return Scheduler(night, make_agent).run()


def in_background(function, *args):
    """function(*args) in a daemon thread (an agent call never holds up the exit); a Future of its result."""
    future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(function(*args))
        except BaseException as error:  # fail() raises SystemExit: the driver re-raises it
            future.set_exception(error)
    threading.Thread(target=target, daemon=True).start()
    return future


class Scheduler:
    def __init__(self, night, make_agent):
        self.night, self.args, self.ledger, self.make_agent = night, night.args, night.ledger, make_agent
        self.slots = night.cluster.slots
        self.workers = WorkerRuns(night)
        self.queue = []  # heap of (priority, order, experiment number, repeat, a run of the best beside it?)
        self.order = itertools.count()
        self.experiments = {}  # number: Experiment, every one not decided yet
        self.asking = {}  # Future of an agents.Change: (Experiment, attempt, started, scratch worktree or None)
        self.scratch_root = night.state_dir / "scratch"
        self.next_number = self.ledger.next_experiment()

    def run(self):
        try:
            self.start()
            while True:
                reason = self.why_stop()
                self.send_runs()
                if not reason:
                    self.ask_for_ideas()
                if not (self.queue or self.workers.busy() or self.workers.refused or self.asking):
                    assert reason, "nothing in flight, and no reason to stop"  # ask_for_ideas always asks
                    return reason
                self.wait()
        finally:  # Ctrl-C, SIGTERM, an error: nothing may outlive the night
            self.workers.cancel()
            self.stop_agent_processes()
            shutil.rmtree(self.scratch_root, ignore_errors=True)
            self.night.repo.git.worktree("prune")

    def stop_agent_processes(self):
        """Kill the claude CLI calls still running in their scratch worktrees: an agent call runs in a thread,
        which nothing can interrupt, and its process would go on (and spend) after the night."""
        scratch = self.scratch_root.resolve()
        for process in psutil.Process().children(recursive=True):
            try:
                inside = Path(process.cwd()).is_relative_to(scratch)
            except psutil.Error:  # ended meanwhile, or not ours to look at
                continue
            if inside:
                runner.kill_tree(process.pid)

    def why_stop(self):
        return why_stop(self.night, open_count=len(self.experiments))

    # -------------------------------------------------------------------------
    # Starting and resuming: the baseline, and the experiments a killed driver left undecided

    def start(self):
        shutil.rmtree(self.scratch_root, ignore_errors=True)  # a killed driver's
        self.night.repo.git.worktree("prune")
        if self.ledger.best() is None:
            commit = state.head_commit(self.night.repo)
            baseline = Experiment(0, None, "baseline", commit, state.keep_reachable(self.night.repo, self.args.tag,
                                                                                      commit))
            self.experiments[0] = baseline
            runs, done = self.baseline_runs(), len(self.ledger.measured(commit))
            if done < runs:
                log(f"#0 the unmodified train.py: the baseline, runs "
                    f"{', '.join(map(str, range(done + 1, runs + 1)))} of {runs}")
                self.enqueue(baseline, CONFIRM, range(done + 1, runs + 1))
            else:  # a driver killed between the baseline's last run and its row
                self.judge_baseline(baseline)
        for number, proposal in sorted(self.ledger.open_experiments().items()):
            first = [r for r in self.ledger.events("proposal") if r["experiment"] == number and r["ok"]][0]
            base = proposal.get("base") or self.ledger.best()["commit"]  # a ledger from before bases were recorded
            experiment = Experiment(number, base, first["description"], proposal["commit"], proposal["ref_number"],
                                    proposal["attempt"])
            self.experiments[number] = experiment
            log(f"#{number} resumed: \"{experiment.description}\" ({experiment.commit[:7]})")
            runs = [r for r in self.ledger.events("run") if r["commit"] == experiment.commit
                    or (r["experiment"] == number and r.get("reference"))]
            if runs:  # decided as if they had just ended: more runs, a fix, or its row
                experiment.ended = runs
                self.judge(experiment)
            else:
                self.enqueue(experiment, FIRST, [1])

    def baseline_runs(self):
        return self.args.noise_runs if self.args.keep_rule == "noise" else 1

    # -------------------------------------------------------------------------
    # Runs: a queue in priority order, out to the workers

    def enqueue(self, experiment, priority, repeats, reference=False):
        """Queue runs of the experiment's commit (reference: of its base, beside them, pair by pair)."""
        for repeat in repeats:
            heapq.heappush(self.queue, (priority, next(self.order), experiment.number, repeat, reference))
            experiment.out += 1

    def send_runs(self):
        while self.queue and self.workers.busy() < self.slots:
            _, _, number, repeat, reference = heapq.heappop(self.queue)
            experiment = self.experiments[number]
            commit = experiment.base if reference else experiment.commit
            self.workers.send(number, experiment.attempt, commit, experiment.ref_number, repeat, reference)

    def wait(self):
        """Until a run or an agent call ends (or POLL_SECONDS), then act on what ended."""
        if self.workers.busy() or self.workers.refused:
            ended = self.workers.collect(timeout=POLL_SECONDS)
        elif self.asking:
            concurrent.futures.wait(list(self.asking), timeout=POLL_SECONDS,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            ended = []
        else:  # runs queued for workers Ray has not got yet
            time.sleep(POLL_SECONDS)
            ended = []
        for run in ended:
            experiment = self.experiments[run["experiment"]]
            experiment.out -= 1
            experiment.ended.append(run)
            if not experiment.out:  # all of its runs are back
                self.judge(experiment)
        for future in [future for future in self.asking if future.done()]:
            self.proposed(future)

    # -------------------------------------------------------------------------
    # The agent: ideas asked ahead, fixes after a crash

    def ideas_ahead(self):
        """How many ideas to have in hand beyond the free workers: as many workers as free up during one agent
        call (runs end every run_seconds / slots seconds). One until both have been measured."""
        calls = [r["seconds"] for r in self.ledger.events("proposal") if r["ok"] and r["calls"]][-20:]
        runs = [r["seconds"] for r in self.ledger.valid_runs()][-20:]
        if not calls or not runs or median(runs) <= 0:
            return 1
        return min(self.slots, max(1, math.ceil(self.slots * median(calls) / median(runs))))

    def ask_for_ideas(self):
        best = self.ledger.best()
        if best is None:
            return  # the baseline first: the agent is shown its number
        while (self.slots + self.ideas_ahead() - self.workers.busy() - len(self.queue) - len(self.asking) > 0
               and not self.why_stop() and not (self.args.agent == "optuna" and self.asking)):
            experiment = Experiment(self.next_number, best["commit"])
            self.next_number += 1
            self.experiments[experiment.number] = experiment
            testing = [e.description for e in self.experiments.values() if e.number and e.description]
            source = state.file_at(self.night.repo, best["commit"], "train.py")
            log(f"#{experiment.number} asking {self.args.agent} for an idea"
                + (f" ({len(testing)} being tested now)" if testing else ""))
            prompt = idea_prompt(self.ledger, source, testing, before_proposal(self.night), self.args.plateau)
            self.ask(experiment, 0, prompt, best["commit"])

    def ask(self, experiment, attempt, prompt, on):
        """Start a conversation about the experiment on commit `on`: an idea, or a fix of it."""
        source, scratch = state.file_at(self.night.repo, on, "train.py"), None
        if self.args.agent == "claude-code":  # it edits files: a tree of its own, never one a run or proposal uses
            scratch = self.scratch_root / f"{experiment.number}-{attempt}"
            agent = self.make_agent(state.add_scratch_worktree(self.night.repo, scratch, on))
        else:
            agent = self.night.agent if self.args.agent == "optuna" else self.make_agent(self.night.repo)
        arguments = (agent, prompt, source, self.args.max_edit_retries, self.args.max_tokens, f"#{experiment.number}",
                     already_run(self.night))
        if self.args.agent == "optuna":  # stateful and fast: one at a time, here
            future = concurrent.futures.Future()
            try:
                future.set_result(ask_for_change(*arguments))
            except Exception as error:
                future.set_exception(error)
        else:
            future = in_background(ask_for_change, *arguments)
        self.asking[future] = (experiment, attempt, time.time(), scratch)

    def proposed(self, future):
        experiment, attempt, started, scratch = self.asking.pop(future)
        if scratch:
            state.remove_scratch_worktree(self.night.repo, scratch)
        change = future.result()  # an agent that failed for good (fail()) stops the night here
        night, number = self.night, experiment.number
        if change.source is None:
            record_proposal(night, number, attempt, change, started)
            last = experiment.ended[-1] if attempt else None
            if change.violation and attempt:  # a fix that edits another file
                self.conclude(experiment, "invalid", change.error, dict(last, problems=[change.error]))
            elif change.violation:
                record_result(night, number, dict(commit="0" * 40, metrics={}), change.description, "invalid",
                              change.error)
                del self.experiments[number]
            elif attempt:  # no usable fix: the crash stands
                self.conclude(experiment, "crash", f"exit code {last['returncode']}, no val_bpb", last)
            else:
                night.failed_proposals_in_a_row += 1
                del self.experiments[number]
            return
        parent = experiment.commit if attempt else experiment.base  # a fix goes on top of what crashed
        commit = state.commit_source(night.repo, parent, change.source, change.description)
        ref_number = state.keep_reachable(night.repo, self.args.tag, commit)
        record_proposal(night, number, attempt, change, started, commit, ref_number=ref_number, base=experiment.base)
        if attempt == 0:
            night.failed_proposals_in_a_row = 0
            experiment.description = change.description
            log(f"#{number} the idea: {change.description}")
        experiment.commit, experiment.ref_number, experiment.attempt, experiment.ended = commit, ref_number, attempt, []
        self.enqueue(experiment, CONFIRM if attempt else FIRST, [1])

    # -------------------------------------------------------------------------
    # Decisions, in the order experiments end

    def judge(self, experiment):
        """All runs of the experiment's commit are back: decide it, or send it out again, or ask for a fix."""
        runs, args = experiment.ended, self.args
        if experiment.number == 0:
            return self.judge_baseline(experiment)
        if failed := [r for r in runs if r.get("reference") and not r["ok"]]:
            return self.conclude(experiment, "discard", f"the best's own run beside it failed (see "
                                 f"{failed[-1]['log']}): nothing to compare it with", runs[-1])
        runs = [r for r in runs if not r.get("reference")]
        if invalid := [r for r in runs if r["problems"]]:
            return self.conclude(experiment, "invalid", "; ".join(invalid[-1]["problems"]), invalid[-1])
        if failed := [r for r in runs if not r["ok"]]:
            run = failed[-1]
            if run["repeat"] > 1:
                return self.conclude(experiment, "crash", f"run {run['repeat']} of the same commit failed "
                                     f"(see {run['log']})", run)
            if run["timed_out"]:
                return self.conclude(experiment, "crash", "killed at the time limit", run)
            if experiment.attempt < args.max_fix_attempts:
                fix = experiment.attempt + 1
                log(f"#{experiment.number} crashed; asking for fix {fix} of {args.max_fix_attempts}")
                source = state.file_at(self.night.repo, experiment.commit, "train.py")
                return self.ask(experiment, fix, fix_prompt(self.ledger, experiment.description, run, fix,
                                                            args.max_fix_attempts, source, before_proposal(self.night)),
                                experiment.commit)
            return self.conclude(experiment, "crash", f"exit code {run['returncode']}, no val_bpb", run)
        noise = keep_rule.noise_estimate(self.ledger.run_groups().values())
        if is_paired(args):
            candidate, reference = self.ledger.paired_runs(experiment.number, experiment.commit)
            status, reason = keep_rule.decide_paired(candidate, reference,
                                                     self.ledger.measured(experiment.base)[-args.max_runs:], noise,
                                                     args.max_runs, args.min_delta)
        else:
            candidate, reference = self.ledger.measured(experiment.commit), {}
            bound = keep_rule.plausibility_bound(self.ledger.kept_val_bpbs())
            status, reason = keep_rule.decide(candidate, self.ledger.measured(experiment.base), noise, bound,
                                              args.keep_rule, args.max_runs, args.min_delta)
        if status:
            return self.conclude(experiment, status, reason, runs[-1])
        log(f"#{experiment.number} {reason}")
        experiment.ended = []
        if args.keep_rule == "greedy":
            return self.enqueue(experiment, CONFIRM, [len(candidate) + 1])
        # Every run it still needs goes out at once; paired, each pair side by side (they run at the same time),
        # after the best's run that pairs with the first run, which ran alone.
        paired = is_paired(args)
        if paired and len(reference) < len(candidate):
            self.enqueue(experiment, CONFIRM, range(len(reference) + 1, len(candidate) + 1), reference=True)
        for pair in range(len(candidate) + 1, args.max_runs + 1):
            self.enqueue(experiment, CONFIRM, [pair])
            if paired:
                self.enqueue(experiment, CONFIRM, [pair], reference=True)

    def judge_baseline(self, baseline):
        runs = self.baseline_runs()
        for run in baseline.ended:
            check_baseline_run(self.night, run)
        done = len(self.ledger.measured(baseline.commit))
        if done < runs:  # a run that went out again after its worker died, say
            baseline.ended = []
            return self.enqueue(baseline, CONFIRM, range(done + 1, runs + 1))
        finish_baseline(self.night, baseline.commit, runs)
        del self.experiments[0]

    def conclude(self, experiment, status, reason, run):
        """The experiment's row. A keep against a base that is no longer the best becomes a discard, and its change
        goes on top of the best as a new experiment (recorded after the row: a driver killed in between loses the
        re-application, never runs it twice)."""
        best, merged = self.ledger.best()["commit"], None
        if experiment.base != best and status in ("keep", "discard"):
            reason = f"against its base {experiment.base[:7]}: {reason}"
            if status == "keep":
                merged = state.merge_train_py(self.night.repo, experiment.base, best, experiment.commit)
                if merged is None:
                    outcome = f"but the best is now {best[:7]}, and this change conflicts with it: not re-applied"
                elif merged == state.file_at(self.night.repo, best, "train.py"):
                    outcome, merged = f"but the best is now {best[:7]}, which already has this change", None
                else:
                    outcome = f"but the best is now {best[:7]}: re-applied on top of it as #{self.next_number}"
                status, reason = "discard", f"{reason}; {outcome}"
        del self.experiments[experiment.number]
        record_result(self.night, experiment.number, run, experiment.description, status, reason)
        if merged is not None:
            self.reapply(experiment, best, merged)

    def reapply(self, experiment, best, merged):
        """A change that beat its base, merged onto the best that moved on, as a new experiment. It is the end of an
        experiment already in flight, so it runs even past a limit (--max-experiments may be exceeded by it)."""
        repo, suffix = self.night.repo, f" on top of {best[:7]}"
        description = ON_TOP.sub("", experiment.description)[:MAX_DESCRIPTION - len(suffix)] + suffix
        commit = state.commit_source(repo, best, merged, description)
        again = Experiment(self.next_number, best, description, commit, state.keep_reachable(repo, self.args.tag,
                                                                                             commit))
        self.next_number += 1
        change = Change(description=description, source=merged, hypothesis=self.ledger.hypothesis(experiment.number))
        record_proposal(self.night, again.number, 0, change, time.time(),
                        commit, ref_number=again.ref_number, base=best, merged_from=experiment.commit)
        self.experiments[again.number] = again
        self.enqueue(again, CONFIRM, [1])
        log(f"#{again.number} #{experiment.number}'s change, merged onto the best {best[:7]}: {description}")
