"""
The one engine of every night: runs go out to an executor with N slots (runs.LocalExecutor here, one slot per GPU;
ray_executor.RayExecutor on a cluster), the agent proposes, and each experiment is decided by decisions.next_action
every time one of its runs ends. agent_loop.run_night: `reason = Engine(night, make_agent).run()`.

One slot is a serial night; with more, ideas are asked ahead while runs go on. A free slot takes the runs an
experiment needs to be decided first (pairs side by side), then a new idea's first. Candidates are committed beside
the branch, which always points at the best; one that beat its base after the best moved on is rebased onto the
best (its change merged, or its whole train.py) and judged again. A resume is the same code: each experiment the
ledger leaves undecided goes on from the runs it holds.
"""

import concurrent.futures
import contextlib
import itertools
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from autoresearch import decisions, integrity, keep_rule, report, run_folders, run_log, runner, state, weights
from autoresearch.agents import Change, ask_for_change, source_digest
from autoresearch.console import clear_status, fail, log, plural, show_status
from autoresearch.night import (already_run, before_proposal, record_proposal, record_result, time_limit,
                               time_left_text, typical_seconds, why_stop)
from autoresearch.prompts import fix_prompt, idea_prompt
from autoresearch.runs import COMPILE_CACHE, RunKey, Runs

POLL_SECONDS = 0.2  # how long the driver waits for a run or an agent call to end before it looks again
HEARTBEAT_SECONDS = 60  # a wait with nothing to show says what it waits for this often
CONFIRM, FIRST = 0, 1  # priorities: the runs an experiment needs to be decided go out before a new idea's first


@dataclass
class Experiment:
    """One experiment not decided yet: being proposed, running, or waiting for a fix."""
    number: int
    base: str | None  # the best commit it is judged against (None: the baseline)
    description: str = ""
    commit: str | None = None
    ref_number: int | None = None
    attempt: int = 0  # 0: the idea; k: its k-th fix after a crash
    rebase: str = ""  # "merge" or "program" once rebased onto a best that moved on
    notes: list = field(default_factory=list)  # what each rebase said, for the row's reason
    crashed: dict = None  # the run a fix is asked for


def call(function, *args, background=True):
    """function(*args) in a daemon thread (an agent call never holds up the exit), or here (Optuna); a Future."""
    future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(function(*args))
        except BaseException as error:  # fail() raises SystemExit: the driver re-raises it
            future.set_exception(error)
    if background:
        threading.Thread(target=target, daemon=True).start()
    else:
        target()
    return future


class Engine:
    def __init__(self, night, make_agent):
        self.night, self.args, self.ledger, self.make_agent = night, night.args, night.ledger, make_agent
        self.executor, self.runs, self.rule = night.executor, Runs(night, night.executor), decisions.Rule(
            self.args.keep_rule, self.args.keep_rule == "noise" and self.args.paired == "on", self.args.noise_runs,
            self.args.max_runs, self.args.min_delta, self.args.max_fix_attempts)
        self.queued, self.order = {}, itertools.count()  # RunKey: (priority, order): the runs waiting for a slot
        self.experiments = {}  # number: Experiment, every one not decided yet
        self.asking = {}  # Future of an agents.Change: (Experiment, attempt, started, scratch worktree or None)
        self.scratch_root = night.state_dir / "scratch"
        self.next_number = self.ledger.next_experiment()
        self.first_record = len(self.ledger.records)  # the ledger's records from here on are this start's
        self.heard = self.progress_shown = time.time()

    def run(self):
        """Experiment until a limit (then finish what is in flight) or an interrupt; the reason it stopped."""
        try:
            self.resume()
            while True:
                reason = why_stop(self.night, len(self.experiments))
                self.send_runs()
                if not reason:
                    self.ask_for_ideas()
                if not (self.queued or self.runs.out or self.runs.refused or self.asking):
                    assert reason, "nothing in flight, and no reason to stop"  # ask_for_ideas always asks
                    return reason
                self.wait()
        except KeyboardInterrupt:
            log("interrupted: stopping the runs and the agent's calls (the ledger keeps every run that ended)")
            raise
        finally:  # Ctrl-C, SIGTERM, an error: nothing may outlive the night, and a signal does not cut this short
            stopping, self.night.stopping = self.night.stopping, True
            for step in (clear_status, self.runs.cancel_all, self.stop_agent_processes,
                         lambda: shutil.rmtree(self.scratch_root, ignore_errors=True),
                         lambda: self.night.repo.git.worktree("prune")):
                try:
                    step()
                except Exception as error:  # the next steps still run
                    log(f"cleaning up: {type(error).__name__}: {error}")
            self.night.stopping = stopping

    def keep_models(self):
        """The baseline's and the best's weights kept, the others' removed (weights.tidy); a disk error is said, and
        the night goes on."""
        busy = [request.weights for request, _ in self.runs.out.values() if request.weights]
        try:
            weights.tidy(self.night.state_dir, self.ledger, self.night.constants, busy)
        except (OSError, ValueError) as error:
            log(f"keeping the models in {self.night.state_dir / weights.MODELS}: {type(error).__name__}: {error}")

    def stop_agent_processes(self):
        """Kill the claude CLI calls still running in scratch worktrees: their threads cannot be stopped."""
        scratch = self.scratch_root.resolve()
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # ended meanwhile, or not ours to look at
                if Path(process.cwd()).is_relative_to(scratch):
                    run_folders.kill_tree(process.pid)

    # -------------------------------------------------------------------------
    # Starting and resuming: every experiment the ledger leaves undecided goes on from its runs

    def resume(self):
        shutil.rmtree(self.scratch_root, ignore_errors=True)  # a killed driver's
        self.keep_models()  # what a killed driver copied but never recorded goes
        for partial in self.night.state_dir.glob(f"{COMPILE_CACHE}.*.tmp"):  # and a compile cache it was copying
            shutil.rmtree(partial, ignore_errors=True)
        self.night.repo.git.worktree("prune")
        if self.ledger.best() is None and not why_stop(self.night, 0):  # a limit reached: no baseline starts
            commit = self.ledger.base_commit()
            baseline = Experiment(0, None, "baseline", commit, state.keep_reachable(self.night.repo, self.args.tag,
                                                                                      commit))
            self.experiments[0] = baseline
            self.advance(baseline)
        for number, proposal in sorted(self.ledger.open_experiments().items()):
            proposals = [r for r in self.ledger.events("proposal") if r["experiment"] == number and r["ok"]]
            experiment = Experiment(number, proposal["base"],
                                    self.ledger.description(number), proposal["commit"], proposal["ref_number"],
                                    proposal["attempt"], proposal.get("rebase", ""),
                                    [r["note"] for r in proposals if r.get("note")])
            self.experiments[number] = experiment
            log(f"#{number} resumed: \"{experiment.description}\" ({experiment.commit[:7]})")
            self.advance(experiment)

    # -------------------------------------------------------------------------
    # Deciding: after every run of an experiment that ends, decisions.next_action says what it needs next

    def advance(self, experiment):
        ledger, rule = self.ledger, self.rule
        candidate, reference = ledger.experiment_runs(experiment.number, experiment.commit)
        noise = keep_rule.noise_estimate(ledger.run_groups().values())
        if experiment.number == 0:  # a failure of an earlier start was its setup's (fixed since): run it again
            earlier = {id(r) for r in ledger.records[:self.first_record]}
            candidate = {pair: run for pair, run in candidate.items() if run["ok"] or id(run) not in earlier}
            action = decisions.baseline_action(candidate, noise, rule)
        else:
            action = decisions.next_action(candidate, reference, ledger.measured(experiment.base), noise,
                                           keep_rule.plausibility_bound(ledger.kept_val_bpbs()), rule,
                                           experiment.attempt, experiment.base, ledger.best()["commit"])
        if action.kind == "run":  # a run of the best beside the candidate is one of the base's
            keys = [RunKey(experiment.number, experiment.base if role == "best" else experiment.commit,
                           experiment.ref_number, pair, role, experiment.commit if role == "best" else "",
                           experiment.attempt) for role, pair in action.runs]
            if fresh := [key for key in keys if key not in self.queued and key not in self.runs.out]:
                if experiment.number == 0 or len(candidate) or reference:
                    log(f"#{experiment.number} {action.reason}")
                for key in fresh:  # a new idea's first run waits for the runs that others need to be decided
                    first = (key.role, key.pair, experiment.attempt, experiment.rebase) == ("candidate", 1, 0, "")
                    self.queued[key] = (FIRST if first and experiment.number else CONFIRM, next(self.order))
        elif action.kind == "refused":
            fail(f"{action.reason} Fix the setup, then run agent_loop.py again with --tag {self.args.tag}.")
        elif action.kind == "fix":
            self.ask_for_fix(experiment, action.run)
        elif action.kind == "rebase":
            self.rebase(experiment, action)
        else:
            self.conclude(experiment, action.kind, action.reason, action.run)

    def rebase(self, experiment, action):
        """A winner whose base is no longer the best, judged again on it: merged onto it, or as a whole program."""
        repo, best = self.night.repo, self.ledger.best()["commit"]
        merged = state.merge_train_py(repo, experiment.base, best, experiment.commit)
        try:  # two edits that each compile can merge into one that does not: then the whole program runs
            compile(merged or "", "train.py", "exec")
        except SyntaxError:
            merged = None
        source = merged if merged is not None else state.file_at(repo, experiment.commit, "train.py")
        note = f"{action.reason}; the best is now {best[:7]}"
        if earlier := already_run(self.night, besides=experiment.number).get(source_digest(source)):
            return self.conclude(experiment, "discard", f"{note}; on it, its train.py would be that of {earlier}: "
                                 "not run again", action.run)
        how = "merge" if merged is not None else "program"
        note += (": its change, merged onto the best, runs against it" if how == "merge" else
                 ": its change conflicts with the best's, so its whole train.py runs against the best")
        commit = state.commit_source(repo, best, source, experiment.description)
        number = state.keep_reachable(repo, self.args.tag, commit)
        change = Change(description=experiment.description, source=source,
                        hypothesis=self.ledger.hypothesis(experiment.number))
        record_proposal(self.night, experiment.number, experiment.attempt, change, time.time(), commit,
                        ref_number=number, base=best, rebase=how, merged_from=experiment.commit, note=note)
        log(f"#{experiment.number} {note}")
        experiment.notes.append(note)
        experiment.commit, experiment.ref_number, experiment.base, experiment.rebase = commit, number, best, how
        self.advance(experiment)

    def conclude(self, experiment, status, reason, run):
        """The experiment's row; then, in one place, what follows a row."""
        number = experiment.number
        del self.experiments[number]
        self.queued = {key: place for key, place in self.queued.items() if key.experiment != number}
        for key in [key for key in self.runs.out if key.experiment == number]:  # decided without them (a discard
            self.runs.out.pop(key)  # after one pair, say): stopped, to free their slots
            self.executor.cancel(key)
        reason = "; ".join(experiment.notes + [reason])
        record_result(self.night, number, run, experiment.description, status, reason,
                      **({"rebase": experiment.rebase} if experiment.rebase else {}))
        self.after_result(number, status, reason, experiment.description)

    def after_result(self, number, status, reason, description):
        """results.tsv and report.html anew, the branch at the best, the harness checked after a broken rule."""
        night, best = self.night, self.ledger.best()
        state.write_results_tsv(self.ledger.results(), night.state_dir)
        report.write_html(self.ledger, night.state_dir / "report.html", f"autoresearch {self.args.tag}", live=True)
        state.move_branch(night.repo, night.branch, best["commit"])
        if status == "invalid" and (changed := integrity.fingerprint_changes(night.fingerprint,
                                                                              integrity.harness_fingerprint())):
            fail(f"experiment {number} changed the prepared cache ({', '.join(changed)}): later results would not "
                 f"be comparable. Restore it (run prepare.py again with the same flags), or start a new --tag.")
        log(f"#{number} {status}: {reason}. \"{description}\" (best {best['val_bpb']:.6f}); "
            f"spent ${self.ledger.spent_usd():.2f}")

    # -------------------------------------------------------------------------
    # Runs: a queue in priority order, out to the executor's slots

    def send_runs(self):
        while self.queued and self.executor.free_slots() > 0:
            key = min(self.queued, key=self.queued.get)
            del self.queued[key]
            what = (f"the best {key.commit[:7]} beside it (pair {key.pair})" if key.role == "best" else
                    f"{key.commit[:7]}{f' again ({key.pair})' if key.pair > 1 else ''}")
            log(f"#{key.experiment} running {what} (time limit {time_limit(self.night)[0]:.0f}s"
                f"{time_left_text(self.night)})")
            self.runs.send(key)

    def wait(self):
        """Until a run or an agent call ends (or POLL_SECONDS), then act on what ended."""
        ended = []
        if self.runs.out or self.runs.refused:
            ended = self.runs.collect(timeout=POLL_SECONDS)
        elif self.asking:
            concurrent.futures.wait(list(self.asking), timeout=POLL_SECONDS,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        else:  # runs queued for slots the executor does not have now (a cluster whose nodes are gone)
            time.sleep(POLL_SECONDS)
        if ended and not self.executor.remote and (changed := state.dirty_tracked_files(self.night.repo)):
            fail(f"tracked files of the repository changed during the night ({', '.join(changed)}): a run may have "
                 "written them (train.py can reach it by its absolute path). Look at them (git diff), commit or "
                 "revert them, then run the same command again to resume.")
        for run in ended:
            self.heard = time.time()
            outcome = f"val_bpb {run['val_bpb']:.6f}" if run["ok"] else "no valid val_bpb"
            where = f" on {run['worker']['hostname']} ({run['worker']['gpu']})" if "worker" in run and \
                self.executor.remote else ""
            what = (f"baseline run {run['repeat']} of {self.rule.baseline_runs()}" if run["experiment"] == 0 else
                    f"the best's run {run['repeat']}" if run.get("reference") else f"run {run['repeat']}")
            log(f"#{run['experiment']} {what}{where}: {outcome} ({run['seconds']:.0f}s)")
            experiment = self.experiments.get(run["experiment"])
            if experiment and (run.get("beside") or run["commit"]) == experiment.commit:
                self.advance(experiment)
        if ended:
            self.keep_models()
        for future in [future for future in self.asking if future.done()]:
            self.heard = time.time()
            self.proposed(future)
        self.show_progress()

    def show_progress(self):
        """The runs' progress from their logs (not a Ray run's): a line rewritten in place on a terminal, else a line
        per run every runner.PROGRESS_EVERY seconds; after HEARTBEAT_SECONDS with nothing shown, what it waits for."""
        now, tty = time.time(), sys.stdout.isatty()
        due = not self.executor.remote and (tty or now - self.progress_shown >= runner.PROGRESS_EVERY)
        statuses = [(key, status) for key, (request, _) in self.runs.out.items()
                    if due and (status := run_log.run_status(request.log_path))]
        if statuses and tty:
            show_status(" | ".join(f"#{key.experiment} {status}" for key, status in statuses)
                        + time_left_text(self.night).replace(",", " |", 1))
            self.heard = now
        elif statuses:
            for key, status in statuses:
                log(f"#{key.experiment} {status}")
            self.progress_shown = self.heard = now
        if now - self.heard >= HEARTBEAT_SECONDS:
            log(f"waiting for {self.waiting_for()}")
            self.heard = now

    def waiting_for(self):
        parts = []
        if self.runs.out:
            runs = ", ".join(f"#{key.experiment} {'the best beside it' if key.role == 'best' else 'run'} {key.pair}"
                             for key in self.runs.out)
            parts.append(f"{plural(len(self.runs.out), 'run')} ({runs}), {self.executor.describe()}")
        if self.queued:
            parts.append(f"{plural(len(self.queued), 'run')} queued for a free slot"
                         + (f": {why}" if (why := self.executor.waiting_for()) else ""))
        if self.asking:
            parts.append(f"{self.args.agent} for " + ", ".join(f"#{experiment.number} ({time.time() - started:.0f}s)"
                                                                for experiment, _, started, _ in self.asking.values()))
        return "; ".join(parts) or "nothing"

    # -------------------------------------------------------------------------
    # The agent: ideas (asked ahead with several slots), fixes after a crash

    def ideas_ahead(self):
        """Ideas to have in hand beyond the free slots: as many slots as free up during one agent call; none with
        one slot (a serial night), one until both are measured."""
        if self.executor.slots == 1:
            return 0
        run, call = typical_seconds(self.ledger)
        if not call or not run:
            return 1
        return min(self.executor.slots, max(1, math.ceil(self.executor.slots * call / run)))

    def wants_idea(self):
        if self.executor.slots == 1:
            return not self.experiments
        if not getattr(self.night.agent, "in_background", True) and self.asking:
            return False  # asked one at a time
        return self.executor.slots + self.ideas_ahead() - len(self.runs.out) - len(self.queued) - len(self.asking) > 0

    def ask_for_ideas(self):
        best = self.ledger.best()
        if best is None:
            return  # the baseline first: the agent is shown its number
        while self.wants_idea() and not why_stop(self.night, len(self.experiments)):
            experiment = Experiment(self.next_number, best["commit"])
            self.next_number += 1
            self.experiments[experiment.number] = experiment
            testing = [e.description for e in self.experiments.values() if e.number and e.description]
            source = state.file_at(self.night.repo, best["commit"], "train.py")
            log(f"#{experiment.number} asking {self.args.agent} for an idea"
                + (f" ({len(testing)} being tested now)" if testing else ""))
            prompt = idea_prompt(self.ledger, source, testing, before_proposal(self.night), self.args.plateau)
            self.ask(experiment, 0, prompt, best["commit"], source)

    def ask_for_fix(self, experiment, run):
        reason = why_stop(self.night, len(self.experiments))
        if reason and reason.startswith("spent $"):  # a fix would spend more
            return self.conclude(experiment, "crash", f"{decisions.crash_reason(run)}; no fix asked: {reason}", run)
        fix, experiment.crashed = experiment.attempt + 1, run
        log(f"#{experiment.number} crashed; asking for fix {fix} of {self.args.max_fix_attempts}")
        source = state.file_at(self.night.repo, experiment.commit, "train.py")
        self.ask(experiment, fix, fix_prompt(self.ledger, experiment.description, run, fix,
                                             self.args.max_fix_attempts, source, before_proposal(self.night)),
                 experiment.commit, source)

    def ask(self, experiment, attempt, prompt, on, source):
        """Start a conversation about the experiment on commit `on` (whose train.py is source): an idea or a fix."""
        scratch, night = None, self.night
        if self.args.agent == "claude-code":  # it edits files: a tree of its own, never one a run or proposal uses
            scratch = self.scratch_root / f"{experiment.number}-{attempt}"
            agent = self.make_agent(state.add_scratch_worktree(night.repo, scratch, on))
        else:  # a conversation of its own, unless the agent asks one thing at a time (Optuna)
            agent = self.make_agent(night.repo) if getattr(night.agent, "in_background", True) else night.agent
        arguments = (agent, prompt, source, self.args.max_edit_retries, self.args.max_tokens, f"#{experiment.number}",
                     already_run(night), lambda: self.executor.device_type)  # torch's import only if needed
        future = call(ask_for_change, *arguments, background=getattr(agent, "in_background", True))
        self.asking[future] = (experiment, attempt, time.time(), scratch)

    def proposed(self, future):
        experiment, attempt, started, scratch = self.asking.pop(future)
        if scratch:
            state.remove_scratch_worktree(self.night.repo, scratch)
        change, night = future.result(), self.night  # an agent that failed for good (fail()) stops the night here
        if change.source is None:
            return self.no_change(experiment, attempt, change, started)
        if not attempt:  # what was true when the idea was asked may not be now
            if reason := why_stop(self.night, len(self.experiments) - 1, asked=True):  # the others open
                return self.not_run(experiment, change, started, f"{reason} while it was being asked")
            if earlier := already_run(night).get(source_digest(change.source)):
                return self.not_run(experiment, change, started, f"its train.py is byte-identical to that of "
                                    f"{earlier}, proposed at the same time")
        parent = experiment.commit if attempt else experiment.base  # a fix goes on top of what crashed
        commit = state.commit_source(night.repo, parent, change.source, change.description)
        number = state.keep_reachable(night.repo, self.args.tag, commit)
        record_proposal(night, experiment.number, attempt, change, started, commit, ref_number=number,
                        base=experiment.base)
        if attempt == 0:
            night.failed_proposals_in_a_row = 0
            experiment.description = change.description
            log(f"#{experiment.number} the idea: {change.description}")
        experiment.commit, experiment.ref_number, experiment.attempt = commit, number, attempt
        self.advance(experiment)

    def no_change(self, experiment, attempt, change, started):
        """No usable change came of the conversation: a fix that breaks a rule makes the experiment invalid, a
        missing fix leaves the crash, an idea that breaks a rule is an invalid row, and a missing idea is a gap."""
        record_proposal(self.night, experiment.number, attempt, change, started)
        crashed = experiment.crashed
        if change.violation and attempt:  # a fix that edits another file
            self.conclude(experiment, "invalid", change.error, dict(crashed, problems=[change.error]))
        elif attempt:
            self.conclude(experiment, "crash", decisions.crash_reason(crashed), crashed)
        elif change.violation:  # nothing was committed: the change was refused whole
            experiment.description = change.description
            self.conclude(experiment, "invalid", change.error, dict(commit=state.NO_COMMIT, metrics={}))
        else:
            self.night.failed_proposals_in_a_row += 1
            del self.experiments[experiment.number]

    def not_run(self, experiment, change, started, why):
        log(f"#{experiment.number} not run: {why}")
        record_proposal(self.night, experiment.number, 0, replace(change, source=None, error=f"not run: {why}"),
                        started)
        del self.experiments[experiment.number]
